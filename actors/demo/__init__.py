"""The demo model pair that ships with specserve: a small target LM and its drafter.

Both were trained by `specserve train-demo` on the Python standard library; see
`recipe_stats.json` next to the weights for their sizes, training tokens and losses.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def demo_path(member: str) -> Path:
    """Checkpoint directory of the demo `target` or `drafter`."""
    path = WEIGHTS_DIR / member
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"demo {member} not found at {path}; the package was installed without its weights "
            f"(rebuild them with `specserve train-demo --out {WEIGHTS_DIR}`)"
        )
    return path
