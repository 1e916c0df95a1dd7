"""capsutil: the reusable pieces of the book *Capsule Networks from the Ground Up*."""
from capsutil.runtime import is_quick, mode, pick, pick_device, provenance, setup

__all__ = ["is_quick", "mode", "pick", "pick_device", "provenance", "setup"]
__version__ = "0.1.0"
