"""vMambaX models (SPEC.md section 3): the model, published-checkpoint loading, FLOP counting."""
from .flops import count_flops
from .vmambax import (BackboneLoadReport, VMambaX, checkpoint_filter_fn, from_reference_checkpoint,
                      load_vmamba_backbone, vmambax_tiny)

__all__ = ["VMambaX", "vmambax_tiny", "from_reference_checkpoint", "load_vmamba_backbone",
           "BackboneLoadReport", "checkpoint_filter_fn", "count_flops"]
