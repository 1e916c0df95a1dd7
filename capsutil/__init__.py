"""capsutil: the reusable pieces of the book *Capsule Networks from the Ground Up*."""
from capsutil.runtime import is_quick, mode, pick, pick_device, provenance, setup
from capsutil.zoo import pretrained

__all__ = ["is_quick", "mode", "pick", "pick_device", "pretrained", "provenance", "setup"]
__version__ = "0.1.0"
