"""vMambaX: PET-CT lung tumour segmentation (SPEC.md section 3-5).

Subpackages: ``vmambax.models`` (the model, checkpoint loading, FLOP counting), ``vmambax.data``,
``vmambax.engine``, ``vmambax.metrics``. Importing ``vmambax`` itself stays light: nothing heavy is
imported until a subpackage is.
"""
__version__ = "0.1.0"
