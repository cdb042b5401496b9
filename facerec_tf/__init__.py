"""facerec_tf: insightface-style face recognition training in TensorFlow 2 / Keras 3.

Importing the package has no side effects: it does not configure devices, precision policies
or logging. Sub-packages are imported on demand.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
