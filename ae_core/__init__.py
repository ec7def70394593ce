"""ae_core: autoencoder pretraining and image embeddings, usable without Prefect.

Every stage is a plain function over typed configs; `flows/` wraps them as Prefect tasks.
"""

__version__ = "0.1.0"
