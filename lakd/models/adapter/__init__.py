"""Any ``nn.Module`` behind the feature interface (``FeatureNet``), so every method -- LAKD's local backward
included -- runs on torchvision, timm and user-defined networks unchanged.

``tracing``: the network traced by ``torch.fx`` (torchvision's ``NodePathTracer``) and the one-line errors when
it cannot be; ``heads``: global pooling, classifier and class-map detection on the traced graph; ``tokens``: token
sequences read as patch grids (ViT, DeiT) and how a token head pools them; ``cuts``: the default cut points (only
where every path of the graph passes) and the candidates listed to users; ``pieces``: the graph cut into pieces
run one at a time (``AdaptedNet``, ``adapt``).
"""
from ..base import feature
from .cuts import cut_candidates, default_cuts
from .pieces import AdaptedNet, adapt
from .tracing import trace

__all__ = ["AdaptedNet", "adapt", "cut_candidates", "default_cuts", "trace", "feature"]
