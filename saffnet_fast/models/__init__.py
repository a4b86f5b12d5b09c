"""Models: HRNet-W32, HRNet-DF, HRNet-SF and SAFFNet (every ablation row of the paper).

``build_model(name, ...)`` is the one factory; ``PAPER_ROWS`` lists the paper's Table IV and
Table V rows with the switches that build them and the paper's complexity figures, so the
``saffnet complexity`` command and the tests share one table.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..nn.reference import DEFAULT_DROPOUT, DEFAULT_NEGATIVE_SLOPE
from .hrnet import (HRNET_DF, HRNET_SF, HRNET_W32, BasicBlock, Bottleneck,  # noqa: F401
                    HighResolutionModule, HRNet, HRNetConfig, SAFuseOptions, StageConfig)

__all__ = [
    "MODEL_NAMES",
    "SWITCHES",
    "PaperRow",
    "PAPER_ROWS",
    "build_model",
    "model_config",
    "HRNet",
    "HRNetConfig",
    "StageConfig",
    "SAFuseOptions",
]

SWITCHES = ("scbottle", "safuse", "satransition", "sastem")

# name -> (base network, default switches)
_MODELS: Dict[str, Tuple[HRNetConfig, Dict[str, bool]]] = {
    "hrnet_w32": (HRNET_W32, dict.fromkeys(SWITCHES, False)),
    "hrnet_df": (HRNET_DF, dict.fromkeys(SWITCHES, False)),
    "hrnet_sf": (HRNET_SF, dict.fromkeys(SWITCHES, False)),
    "saffnet": (HRNET_DF, dict.fromkeys(SWITCHES, True)),
}
MODEL_NAMES = tuple(_MODELS)


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table IV (structure ablation) or Table V (module ablation)."""

    table: str            # "IV" or "V"
    name: str             # unique label
    model: str            # build_model name
    switches: Dict[str, bool] = field(default_factory=dict)
    paper_params_m: float = 0.0
    paper_gflops: float = 0.0

    def build(self, **kwargs):
        return build_model(self.model, **self.switches, **kwargs)


def _df(**on: bool) -> Dict[str, bool]:
    return {s: bool(on.get(s, False)) for s in SWITCHES}


PAPER_ROWS: Tuple[PaperRow, ...] = (
    PaperRow("IV", "HRNet-W32", "hrnet_w32", {}, 28.5, 7.10),
    PaperRow("IV", "HRNet-DF", "hrnet_df", {}, 7.8, 4.41),
    PaperRow("IV", "HRNet-SF", "hrnet_sf", {}, 13.3, 5.8),
    PaperRow("V", "DF", "hrnet_df", _df(), 7.8, 4.41),
    PaperRow("V", "DF+SCBottle", "hrnet_df", _df(scbottle=True), 7.75, 4.18),
    PaperRow("V", "DF+SAFuse", "hrnet_df", _df(safuse=True), 8.07, 4.40),
    PaperRow("V", "DF+SATrans", "hrnet_df", _df(satransition=True), 7.86, 4.41),
    PaperRow("V", "DF+SAStem", "hrnet_df", _df(sastem=True), 7.83, 4.41),
    PaperRow("V", "DF+SCBottle+SAFuse", "hrnet_df", _df(scbottle=True, safuse=True), 8.00, 4.19),
    PaperRow("V", "DF+SCBottle+SAFuse+SATrans", "hrnet_df",
             _df(scbottle=True, safuse=True, satransition=True), 8.02, 4.19),
    PaperRow("V", "SAFFNet", "saffnet", _df(scbottle=True, safuse=True, satransition=True,
                                            sastem=True), 8.03, 4.20),
)

# The paper's SAFFNet at other input sizes (Table III MPII 256×256, Table II test-dev 384×288).
PAPER_SAFFNET_GFLOPS_AT = {(256, 256): 5.6, (384, 288): 9.4}


def _check_switch(name: str, value) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"{name}: expected True, False or None (the model's default), got {value!r}")


def _check_input_size(input_size, multiple: int) -> Tuple[int, int]:
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                       for v in input_size)):
        raise ValueError(f"input_size: expected (height, width) as two positive ints, "
                         f"got {input_size!r}")
    height, width = int(input_size[0]), int(input_size[1])
    if height % multiple or width % multiple:
        raise ValueError(f"input_size: height and width must be multiples of {multiple} for "
                         f"this model (its lowest branch is 1/{multiple} of the input), "
                         f"got {height}x{width}")
    return height, width


def model_config(name: str, *, scbottle: Optional[bool] = None, safuse: Optional[bool] = None,
                 satransition: Optional[bool] = None, sastem: Optional[bool] = None,
                 num_joints: int = 17, dropout: Optional[float] = None,
                 negative_slope: Optional[float] = None) -> HRNetConfig:
    """The :class:`HRNetConfig` that ``build_model`` builds (validated)."""
    if not isinstance(name, str) or name.lower() not in _MODELS:
        raise ValueError(f"name: expected one of {MODEL_NAMES}, got {name!r}")
    base, defaults = _MODELS[name.lower()]
    switches = dict(defaults)
    for key, value in (("scbottle", scbottle), ("safuse", safuse),
                       ("satransition", satransition), ("sastem", sastem)):
        value = _check_switch(key, value)
        if value is not None:
            switches[key] = value
    if not isinstance(num_joints, numbers.Integral) or isinstance(num_joints, bool) \
            or num_joints <= 0:
        raise ValueError(f"num_joints: expected a positive int, got {num_joints!r}")
    dropout = DEFAULT_DROPOUT if dropout is None else dropout
    if not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    negative_slope = DEFAULT_NEGATIVE_SLOPE if negative_slope is None else negative_slope
    if not isinstance(negative_slope, numbers.Real) or isinstance(negative_slope, bool):
        raise ValueError(f"negative_slope: expected a number, got {negative_slope!r}")
    return base.replace(num_joints=int(num_joints), dropout=float(dropout),
                        negative_slope=float(negative_slope), **switches)


def build_model(name: str, *, scbottle: Optional[bool] = None, safuse: Optional[bool] = None,
                satransition: Optional[bool] = None, sastem: Optional[bool] = None,
                num_joints: int = 17, input_size=(256, 192), backend: Optional[str] = None,
                dropout: Optional[float] = None, negative_slope: Optional[float] = None):
    """Build ``hrnet_w32``, ``hrnet_df``, ``hrnet_sf`` or ``saffnet``.

    Switches left at ``None`` take the name's default (all off for the HRNets, all on for
    SAFFNet); ``hrnet_df`` with switches gives the Table V rows. ``input_size`` (H, W) is the
    size the model is meant for (stored as ``model.input_size``; heatmaps are H/4 × W/4).
    ``dropout`` / ``negative_slope`` configure the FC steps of SCBottle (defaults in
    :mod:`saffnet_fast.nn.reference`). ``backend`` other than ``None`` / ``"reference"`` swaps
    the reference blocks for fast ones via :func:`saffnet_fast.convert`.
    """
    config = model_config(name, scbottle=scbottle, safuse=safuse, satransition=satransition,
                          sastem=sastem, num_joints=num_joints, dropout=dropout,
                          negative_slope=negative_slope)
    multiple = 4 * 2 ** (len(config.stages[-1].channels) - 1)
    height, width = _check_input_size(input_size, multiple)
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend: expected a backend name or None, got {backend!r}")
    model = HRNet(config)
    model.name = name.lower()
    model.input_size = (height, width)
    model.heatmap_size = (height // 4, width // 4)
    if backend is not None and backend.lower() != "reference":
        from ..fast.convert import convert
        model = convert(model, backend=backend)
    return model
