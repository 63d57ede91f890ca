"""cmcl: continual multimodal contrastive learning over frozen modality-binding encoders.

The toolkit has two stages around an offline feature cache: ``cmcl.extract`` writes embeddings of
frozen encoders to HDF5 shards (``cmcl.data.features``), and ``cmcl.train`` fits one linear learner
per modality step after step with a continual-learning strategy, scored by ``cmcl.evaluate``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
