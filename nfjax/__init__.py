"""nfjax: normalizer-free image classifiers (NFNets, NF-ResNets) in JAX/Flax.

Importing the package is light: it does not import TensorFlow. Sub-packages:
``nfjax.models`` (model zoo), ``nfjax.optim`` (optax chain), ``nfjax.data`` (input pipelines),
``nfjax.train`` / ``nfjax.evaluate`` / ``nfjax.predict`` / ``nfjax.benchmark`` (``python -m`` entry points).
"""

__version__ = "0.1.0"
