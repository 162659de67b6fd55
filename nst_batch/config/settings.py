"""Every manifest key, declared once with all its facts: default, check, help, whether it is in the
recipe, whether `per_style` may set it, and the `nst-batch run` option that sets it, if any.

`Settings` is the declaration: each field's default is the key's default and its metadata the rest.
What others need is derived from it here (SETTINGS, KEYS, PER_STYLE_KEYS, `check`) and elsewhere (the
manifest's `apply`, the recipe's keys, the CLI's option help, docs/settings.md via `reference`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from . import checks as c
from .checks import Checker, fail
from .objective import GATYS, MIN_SIDE, Layers

WEIGHT_SOURCES = ("vgg19-caffe", "torchvision")
# `batch: auto`'s most photos in one batch (and the most a driver claims at once for it).
AUTO_BATCH_MAX = 64


class Unless(NamedTuple):
    """A recipe key left out of the recipe when `test(settings)` holds: a value that cannot change the
    pixels (quality of a PNG), or the value every output had before the key existed, so folders made
    then keep their finished pairs. `says` is how docs/settings.md puts it."""
    test: Callable[["Settings"], bool]
    says: str


@dataclass(frozen=True)
class Setting:
    """One manifest key's facts (its default is the Settings field's)."""
    name: str
    default: Any
    check: Checker  # (name in errors, value, source) -> the value as Settings holds it
    help: str  # one line, for the user: the CLI option's help and docs/settings.md's
    in_recipe: bool  # changes an output's pixels: a pair's recipe hashes it
    unless: Unless | None = None  # in the recipe, except when this holds
    per_style: bool = False  # `per_style` may set it for some styles
    cli: str | None = None  # the `nst-batch run` option that sets it, e.g. "--size"
    shown: str | None = None  # the default as docs say it, where the value alone says little


def key(default: Any, check: Checker, *, help: str, in_recipe: bool, unless: Unless | None = None,
        per_style: bool = False, cli: str | None = None, shown: str | None = None) -> Any:
    """A Settings field declaring one manifest key."""
    facts = dict(check=check, help=help, in_recipe=in_recipe, unless=unless, per_style=per_style, cli=cli,
                 shown=shown)
    return field(default=default, metadata={"setting": facts})


def _empty(k: str) -> Unless:
    return Unless(lambda s: not getattr(s, k), "unless empty")


@dataclass(frozen=True)
class Settings:
    """A run's settings, and the declaration of every manifest key: one `key(default, check, ...)` field
    each (its facts: `Setting`), in the order docs/settings.md lists them."""

    content: Path = key(Path("data/content"), c.folder, in_recipe=False, cli="--content",
                        help="Folder of content photos, searched recursively.")
    styles: Path = key(Path("data/styles"), c.folder, in_recipe=False, cli="--styles",
                       help="Folder of style images; each sub-folder is one blended style.")
    out: Path = key(Path("results"), c.folder, in_recipe=False, cli="--out",
                    help="Output folder (images, losses.csv, ledger, report).")
    size: int = key(512, c.integer(MIN_SIDE, c.MAX_SIDE), in_recipe=True, cli="--size",
                    help="Long side of each output, in pixels.")
    optimizer: str = key("lbfgs", c.choice("lbfgs", "adam"), in_recipe=True,
                         help="How the pixels are optimised: lbfgs or adam.")
    lr: float = key(0.02, c.number(0, strict=True), in_recipe=True,
                    help="Adam's learning rate (pixels are in [0, 1]); L-BFGS ignores it.")
    layers: Layers = key(GATYS, c.layers, in_recipe=True,
                         help="gatys, tutorial, or a mapping {content: [...], style: [...]} of VGG19 layers.")
    # The keys `per_style` may set, together, in the order its error lists them: what changes a style's
    # objective, targets or effort.
    style_weight: float | None = key(None, c.number(0, optional=True), in_recipe=True, per_style=True,
                                     shown="preset's",
                                     help="Weight of the style loss; null: the preset's (gatys 3, tutorial 1e6).")
    content_weight: float | None = key(None, c.number(0, optional=True), in_recipe=True, per_style=True,
                                       shown="preset's",
                                       help="Weight of the content loss; null: the preset's (gatys 1, tutorial 1).")
    tv_weight: float | None = key(None, c.number(0, optional=True), in_recipe=True, per_style=True,
                                  shown="preset's", help="Weight of the total-variation smoothing; null: the "
                                  "preset's (gatys 0.5, tutorial 0).")
    style_size: int | float | None = key(None, c.style_size, in_recipe=True, per_style=True,
                                         help="Long side of the style image: an integer is pixels, a number "
                                         "with a point a fraction of size; null: size.")
    steps: int = key(300, c.integer(1), in_recipe=True, per_style=True, cli="--steps",
                     help="Optimisation steps per scale (one step = one VGG pass).")
    colors: str = key("style", c.choice("style", "preserve", "match"),  # colors.COLORS; that module is torch
                      in_recipe=True, unless=Unless(lambda s: s.colors == "style", "unless style (the default)"),
                      per_style=True,
                      help="Where the output's colours come from: style, preserve (the photo's) or match.")
    pooling: str = key("max", c.choice("max", "avg"), in_recipe=True, help="VGG's pooling: max (its own) or avg.")
    init: str = key("content", c.choice("content", "noise"), in_recipe=True,
                    help="Start from the photo (content) or from noise.")
    weights: str = key("vgg19-caffe", c.weights, in_recipe=True, cli="--weights",
                       help="vgg19-caffe, torchvision, or a state-dict path.")
    device: str = key("auto", c.device, in_recipe=False, cli="--device", help="auto, cpu, cuda, cuda:N or mps.")
    seed: int = key(0, c.integer(0), in_recipe=True,
                    help="Seeds the noise init; CPU runs are deterministic for a given seed.")
    format: str = key("png", c.choice("png", "jpg", aliases={"jpeg": "jpg"}), in_recipe=True,
                      help="Output file format: png or jpg.")
    quality: int = key(95, c.integer(1, 100), in_recipe=True,
                       unless=Unless(lambda s: s.format != "jpg", "unless format is png"),
                       help="JPEG quality, 1 to 100.")
    bit_depth: int = key(8, c.bit_depth, in_recipe=True, help="8 or 16 bits a channel (16: format png only).")
    keep_gps: bool = key(False, c.boolean, in_recipe=True,
                         help="Copy the photo's GPS position into its outputs' EXIF.")
    name: str = key("{style}/{content}", c.name_template, in_recipe=False,
                    help="Where each output goes in the output folder: a template of {style}, {content}, "
                    "{photo} and {folder}.")
    log_every: int = key(10, c.integer(1), in_recipe=False,
                         help="Write a losses.csv row every N steps (logging only).")
    # "auto": from `size` (pyramid.auto_scales), resolved by engine.resolve
    scales: tuple[float, ...] | str = key("auto", c.scales, in_recipe=True,
                                          help="Fractions of size to optimise at in turn, ending at 1.0; auto: "
                                          "chosen from size.")
    stop_window: int = key(20, c.integer(0), in_recipe=True,
                           help="Stop a scale when the loss moved less than stop_tolerance over this many steps; "
                           "0: off.")
    stop_tolerance: float = key(0.01, c.number(0), in_recipe=True,
                                help="The relative loss change stop_window looks for.")
    precision: str = key("auto", c.choice("auto", "fp32", "bf16"), in_recipe=True,
                         help="auto (bf16 VGG forward on CUDA), fp32 or bf16.")
    compile: bool = key(False, c.boolean, in_recipe=False, help="torch.compile the VGG forward.")
    # Not in the recipe: each image of a batch is optimised on its own (core/lbfgs.py), so a batch changes no
    # image beyond the rounding of a batched convolution (bitwise equal at 128 px, benchmarks/lbfgs-results.md),
    # and workers with different cards may then share a folder with `auto`. `auto` by default: a GPU is
    # filled, a CPU (where a batch saves nothing) makes one photo at a time.
    batch: int | str = key("auto", c.batch, in_recipe=False,
                           help="Optimise up to N photos of one style and shape together; auto: as many as "
                           f"fit in a GPU's memory (at most {AUTO_BATCH_MAX}; 1 on a CPU).")
    # Photos of a style share a batch only when their working shapes are equal; buckets make nearly equal ones
    # equal (Engine.shape_of). In the recipe when on: each such image is made at another shape and resized back.
    bucket: int = key(0, c.integer(0, 256), in_recipe=True, unless=Unless(lambda s: not s.bucket, "unless 0"),
                      help="Make each photo at its working size with both sides rounded to a multiple of N px, "
                      "then resize it back, so photos of nearly one shape share a batch; 0: off.")
    lease_s: float = key(120.0, c.number(1), in_recipe=False,
                         help="Seconds a worker's claim on a pair lasts after its last heartbeat.")
    max_megapixels: float = key(100.0, c.number(0, strict=True), in_recipe=False,
                                help="Larger inputs fail as too_large instead of exhausting memory.")
    # (pattern, ((key, value), ...)) in manifest order: the first pattern matching a style's name sets
    # its overrides (plan.style_settings). Tuples, not dicts: Settings stays hashable. Its check is
    # looked up when called: it needs PER_STYLE_KEYS, derived from this class below.
    per_style: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = key(
        (), lambda n, v, source: _per_style(v, source), in_recipe=True, unless=_empty("per_style"),
        help="Settings for some styles only: {PATTERN: {key: value}}; the first matching pattern wins.")
    # (name, ((member file relative to `styles`, weight), ...)): weights as written; the plan normalises.
    blends: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = key(
        (), c.blends, in_recipe=True, unless=_empty("blends"),
        help="Extra styles mixed from several images: {NAME: {style file: weight}}.")
    # How a pair is made: a network-made pair gets a recipe of its own (methods.network_recipe, over its
    # model's recipe and refine_steps); an optimised one keeps the plain recipe, so these three stay out
    # of it and folders made before they existed are not redone.
    method: str = key("auto", c.choice("optimize", "network", "auto"), in_recipe=False,
                      help="optimize, network (a learned network per style), or auto: network where enough "
                      "photos are pending.")
    network_steps: int = key(600, c.integer(1), in_recipe=False, help="Training steps of a style's network.")
    # 70: within 1.06x of optimize's loss on varied real photos (50: 1.09-1.11x), docs/benchmarks.md.
    refine_steps: int = key(70, c.integer(0), in_recipe=False,
                            help="L-BFGS steps at full size from the network's output.")

    def __post_init__(self) -> None:
        # Code may hand `layers` over as the manifest writes it (a preset name or a mapping): one type here.
        object.__setattr__(self, "layers", Layers.parse(self.layers))
        # Likewise per_style and blends as mappings (a test, a stored settings dict): nested tuples here.
        for k in ("per_style", "blends"):
            v = getattr(self, k)
            if isinstance(v, dict):
                object.__setattr__(self, k, tuple((p, tuple(dict(inner).items())) for p, inner in v.items()))

    def style_px(self, size: int) -> int:
        """The style's long side for an output whose long side is `size`: `style_size` pixels (an int),
        that fraction of `size` (a float), or `size` itself (None)."""
        if self.style_size is None:
            return size
        if isinstance(self.style_size, float):
            return max(MIN_SIDE, round(self.style_size * size))
        return self.style_size

    def most_per_batch(self) -> int:
        """The most pairs one batch may hold: `batch`, or for auto AUTO_BATCH_MAX (the engine decides how
        many of them fit, per shape)."""
        return AUTO_BATCH_MAX if self.batch == "auto" else int(self.batch)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """As a manifest writes it (the ledger stores this, and recipes hash it)."""
        d = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        d["scales"] = self.scales if isinstance(self.scales, str) else list(self.scales)
        d["layers"] = self.layers.to_manifest()
        d["per_style"] = {pattern: dict(changes) for pattern, changes in self.per_style}
        d["blends"] = {name: dict(members) for name, members in self.blends}
        return d


SETTINGS: dict[str, Setting] = {f.name: Setting(f.name, f.default, **f.metadata["setting"])
                                for f in dataclasses.fields(Settings)}
KEYS = tuple(SETTINGS)
# One engine shares the model (layers, pooling, weights) and a batch's shape (size) by all styles: those
# are not per style.
PER_STYLE_KEYS = tuple(k for k, s in SETTINGS.items() if s.per_style)


def check(k: str, v: Any, source: str, name: str | None = None) -> Any:
    """The value of key `k` as Settings holds it, or ConfigError naming `name` (default: the key)."""
    return SETTINGS[k].check(name or k, v, source)


def _per_style(v: Any, source: str) -> tuple:
    """{pattern: {key: value}} -> ((pattern, ((key, checked value), ...)), ...), each value checked as the
    top-level key is, an error naming per_style.<pattern>.<key>."""
    out = []
    for pattern, changes in c.mapping("per_style", v, source, "{'starry*': {style_weight: 10}}").items():
        where = f"per_style.{pattern}"
        changes = c.mapping(where, changes, source, "{style_weight: 10, style_size: 0.5}")
        if not changes:
            raise fail(where, "sets nothing; give it keys to override, e.g. {style_weight: 10}", source)
        checked = []
        for k, value in changes.items():
            if k not in PER_STYLE_KEYS:
                raise fail(f"{where}.{k}", f"cannot be set per style (these can: {', '.join(PER_STYLE_KEYS)})",
                           source)
            checked.append((k, check(k, value, source, name=f"{where}.{k}")))
        out.append((pattern, tuple(checked)))
    return tuple(out)
