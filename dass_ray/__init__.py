"""dass_ray: Distillation-aware Student Search (DaSS) on Ray.

The model core (space, nets, remap, embed, predictor, meta, kd, data) is plain PyTorch/numpy; Ray, Tune,
Train and gRPC live in thin layers: `labelgen`/`metatrain_ray` (Ray Train), `scoring` (encoder actors and
predictor replicas), `search` (Tune), `jobs`/`server`/`client` (the gRPC service).
"""

import os as _os

# The batched embedding engine meets many conv shapes; oneDNN's default cache (1024 kernels) thrashes.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

__version__ = "0.1.0"
