"""Every knob of a RAPID3 GRPO run in one typed dataclass: defaults, documentation, YAML, command line.

Precedence: the defaults below < a YAML file (``--config``) < command-line flags (one per field,
``--group-size 8``, ``--no-sparse-attention``). A run folder keeps its ``config.yaml``; ``--resume``
starts from it, so only the flags given on the resuming command change anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..accel.costs import MeasuredStepCosts
from ..accel.profile import CostProfile
from ..common.knobs import knob
from ..common.limits import check_finite, check_seed
from ..policy.config import PolicyConfig

if TYPE_CHECKING:
    from ..eval.side_by_side import SideBySideSettings
    from ..worlds import WorldConfig

CONFIG_FILE = "config.yaml"
"""The run folder's copy of its config, which ``--resume`` starts from."""
REWARD_TERMS = ("q", "d", "f")
"""q: the reward model, d: the discriminator (the paper's two), f: fidelity to full compute (ours)."""
STEP_COSTS = ("flops", "measured")
POLICY_FIELDS = PolicyConfig.names()
"""TrainConfig fields passed unchanged to ``RapidPolicy`` (same names): ``PolicyConfig``'s."""
PIPELINE_FIELDS = ("prompt_file", "eval_prompt_file", "device", "dtype", "height", "width", "disc_model")
"""TrainConfig fields that only apply to a real pipeline (``pipeline``)."""


@dataclass(frozen=True)
class TrainConfig(PolicyConfig):
    """A GRPO training run of RAPID3's policy on the embedded model or a diffusers SD3 / FLUX pipeline."""

    # The policy's knobs (hidden_dim, step_skip, ..., init_dense_prob) are PolicyConfig's, inherited rather than
    # nested: run folders' config.yaml, checkpoints and the flags name them flat (`hidden_dim: 64`, `--hidden-dim`),
    # and a subclass keeps exactly those names while their defaults and documentation live once, in rapid3.policy.

    # --- run
    out: str = knob("runs/rapid3", "run folder: checkpoint.pt, config.yaml, log.jsonl, tensorboard/, curves.png, "
                                       "policy/")
    model: str | None = knob(None, "exported embedded model folder (default: the weights shipped in the package)")
    # --- a real pipeline instead of the embedded model (every knob below needs `pipeline`)
    pipeline: str | None = knob(None, "diffusers StableDiffusion3Pipeline or FluxPipeline to train for: a local "
                                      "folder or a Hub id (default: the embedded model)")
    prompt_file: str | None = knob(None, "training prompts for the pipeline: .txt (one per line) or .jsonl "
                                         "({\"prompt\": ...} per line)")
    eval_prompt_file: str | None = knob(None, "held-out prompts for the pipeline's evaluations (default: "
                                              "eval_prompts prompts set aside from prompt_file)")
    device: str | None = knob(None, "device of the pipeline, policy and reward models (default: cuda if available)")
    dtype: str | None = knob(None, "pipeline dtype: float32, float16 or bfloat16 (default: bfloat16 on GPU, "
                                   "float32 on CPU)")
    height: int | None = knob(None, "image height in pixels (default: the pipeline's)")
    width: int | None = knob(None, "image width in pixels (default: the pipeline's)")
    seed: int = knob(0, "seed of the policy's initialisation, its action draws and the training prompts")
    iterations: int = knob(300, "GRPO iterations to reach in total (a resumed run continues towards it)")
    # --- rollouts
    prompts_per_iteration: int = knob(8, "training prompts per iteration (random train-split captions)")
    group_size: int = knob(8, "G: trajectories per prompt, all from the same initial noise")
    step_cap: int = knob(28, "most steps per image; the full-compute reference runs exactly this many")
    guidance_scale: float = knob(4.0, "classifier-free guidance scale of every sample")
    # --- reward  r = (q + omega * d + psi * f) * (1 - lam^K) / (K * (1 - lam))
    reward: str = knob("q+d", "reward terms joined by '+': q (reward model), d (discriminator), f (fidelity: SSIM "
                              "to the full-compute image from the same noise, clipped to [0, 1]; ours, not the "
                              "paper's); 'q+d' is the paper's")
    reward_model: str | None = knob(None, "embedded: exported reward model folder (default: the one shipped); with "
                                          "pipeline: the CLIPModel (folder or Hub id) of the CLIP-score q, required "
                                          "when the reward has q")
    disc_model: str | None = knob(None, "with pipeline: the CLIP (folder or Hub id) whose frozen vision tower "
                                        "carries the discriminator's adapter (default: reward_model)")
    reward_image_size: int = knob(224, "with pipeline: shorter side images are resized to for q, d and the "
                                       "discriminator's replay buffers (CLIP reads 224)")
    step_costs: str = knob("flops", "what the equivalent steps K of the discount count: 'flops' (each action's FLOPs "
                                    "over a dense step's) or 'measured' (its wall-clock over a dense step's, timed "
                                    "once on this machine at the start of the run; for where FLOPs and time disagree, "
                                    "as sparse attention at a few hundred tokens on a CPU; embedded model only), or "
                                    "a `rapid3 profile` JSON file: each action's time on the profiled machine over "
                                    "a full step's, so K prices actions as the target machine pays them)")
    lam: float = knob(0.97, "compute discount lambda in (0, 1): the speed/quality knob; smaller is faster")
    omega: float = knob(1.0, "weight of the discriminator score d in the reward")
    psi: float = knob(1.0, "weight of the fidelity term f in the reward (with an f reward)")
    # --- policy optimisation (clipped surrogate, per-decision ratios, no KL)
    lr: float = knob(1e-3, "AdamW learning rate of the policy (constant)")
    weight_decay: float = knob(0.0, "AdamW weight decay of the policy")
    inner_epochs: int = knob(2, "passes over each rollout batch")
    minibatches: int = knob(2, "optimizer steps per pass (trajectories split evenly)")
    clip: float = knob(0.2, "PPO clip range of the ratio pi / pi_old")
    grad_clip: float = knob(1.0, "max gradient norm of a policy step")
    # --- discriminator (full-compute images vs the policy's rollouts)
    disc_width: int = knob(32, "embedded: channels of the conv discriminator's first stage (doubled per stage, "
                               "3 stages); with pipeline: hidden width of the CLIP adapter")
    disc_lr: float = knob(3e-4, "AdamW learning rate of the discriminator")
    # Several cheap updates per expensive rollout batch, so d keeps pace with the policy: a d stuck
    # near 0.5 leaves the discount alone to drive K down (1 update at lr 1e-4 stayed at chance in a smoke run).
    disc_steps: int = knob(4, "discriminator updates per iteration")
    # Without a warm-up the discriminator starts at chance (d = 0.5 for every image), so the reward is
    # the discount alone for its first iterations and a smoke run collapsed to "reuse everything" in 6.
    disc_warmup: int = knob(5, "first iterations that train only the discriminator: rollouts fill its replay "
                               "buffer, the policy stays as initialised (counted in iterations; needs a d reward)")
    disc_batch: int = knob(64, "images per class in a discriminator update")
    replay_capacity: int = knob(1024, "images kept per class (rollouts, full-compute originals) for its updates")
    # --- evaluation, checkpoints
    eval_every: int = knob(10, "iterations between held-out evaluations (also after the last one)")
    eval_prompts: int = knob(64, "held-out prompts of each evaluation (fixed set, fixed noise)")
    eval_batch: int = knob(16, "images per batch in evaluation; full compute and policy alternate per batch")
    checkpoint_every: int = knob(1, "iterations between checkpoints (also after the last one)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # first: a NaN passes every comparison below unnoticed
            if isinstance(getattr(self, f.name), float):
                check_finite(f.name, getattr(self, f.name))
        check_seed("seed", self.seed)
        super().__post_init__()  # the policy's knobs
        positive = ("iterations", "prompts_per_iteration", "step_cap", "inner_epochs", "minibatches",
                    "disc_width", "disc_steps", "disc_batch", "replay_capacity", "eval_every", "eval_prompts",
                    "eval_batch", "checkpoint_every", "reward_image_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        self._check_pipeline_knobs()
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare trajectories of a prompt), "
                             f"got {self.group_size}.")
        if self.minibatches > self.prompts_per_iteration * self.group_size:
            raise ValueError(f"minibatches ({self.minibatches}) exceeds the trajectories per iteration "
                             f"({self.prompts_per_iteration * self.group_size}).")
        terms = self.reward_terms
        if not set(terms) <= set(REWARD_TERMS) or len(set(terms)) != len(terms):
            raise ValueError(f"reward must join distinct terms of {', '.join(REWARD_TERMS)} with '+' (e.g. 'q+d', "
                             f"'q+d+f', 'd'); got {self.reward!r}.")
        if self.step_costs not in STEP_COSTS and not self.step_costs.endswith(".json"):
            raise ValueError(f"step_costs must be one of {', '.join(STEP_COSTS)} or a profile .json; "
                             f"got {self.step_costs!r}.")
        if self.disc_warmup < 0:
            raise ValueError(f"disc_warmup must be >= 0, got {self.disc_warmup}.")
        if not 0 < self.lam < 1:
            raise ValueError(f"lam must lie strictly inside (0, 1), got {self.lam}.")
        for name in ("omega", "psi", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("guidance_scale", "lr", "clip", "grad_clip", "disc_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")

    def _check_pipeline_knobs(self) -> None:
        """A real pipeline needs prompts and CLIP reward models; the embedded model takes none of its knobs."""
        if self.pipeline is None:
            given = [name for name in PIPELINE_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only with a pipeline (--pipeline); the embedded model samples "
                                 "its own prompts and has its own reward models.")
            return
        if self.model is not None:
            raise ValueError("give either pipeline (a diffusers pipeline) or model (an embedded model), not both.")
        if self.step_costs == "measured":
            raise ValueError("step_costs 'measured' is implemented for the embedded model only; with a pipeline "
                             "use step_costs 'flops'.")
        if self.prompt_file is None:
            raise ValueError("a pipeline needs training prompts: --prompt-file FILE (.txt or .jsonl).")
        if self.uses_quality and self.reward_model is None:
            raise ValueError(f"reward {self.reward!r} has the quality term q: give --reward-model, a CLIP model "
                             "(folder or Hub id, e.g. openai/clip-vit-large-patch14), or use --reward d.")
        if self.uses_discriminator and self.disc_model is None and self.reward_model is None:
            raise ValueError(f"reward {self.reward!r} has the discriminator term d: give --disc-model (or "
                             "--reward-model), a CLIP model whose vision tower carries the adapter.")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")

    def profiled_step_costs(self) -> MeasuredStepCosts | None:
        """The step costs of the ``rapid3 profile`` file ``step_costs`` names (None for 'flops', 'measured')."""
        if self.step_costs in STEP_COSTS:
            return None
        return CostProfile.load(self.step_costs).step_costs()

    @property
    def reward_terms(self) -> list[str]:
        """The terms of ``reward``, in the order given ("q+d" -> ["q", "d"])."""
        return self.reward.split("+")

    @property
    def uses_quality(self) -> bool:
        """Whether the reward has the reward-model term q."""
        return "q" in self.reward_terms

    @property
    def uses_discriminator(self) -> bool:
        """Whether the reward has the discriminator term d (and a discriminator is trained)."""
        return "d" in self.reward_terms

    @property
    def uses_fidelity(self) -> bool:
        """Whether the reward has the fidelity term f (full-compute images are sampled for it)."""
        return "f" in self.reward_terms

    def world_config(self) -> WorldConfig:
        """What builds this run's world: its model or pipeline, prompts and the reward models its reward uses."""
        from ..worlds import WorldConfig  # here: every CLI command builds this module's parser, cheaply

        return WorldConfig(model=self.model, pipeline=self.pipeline, device=self.device, dtype=self.dtype,
                           height=self.height, width=self.width, image_size=self.reward_image_size,
                           prompt_file=self.prompt_file, eval_prompt_file=self.eval_prompt_file,
                           eval_prompts=self.eval_prompts, reward_model=self.reward_model, disc_model=self.disc_model,
                           disc_width=self.disc_width, disc_lr=self.disc_lr, quality=self.uses_quality,
                           discriminator=self.uses_discriminator)

    def side_by_side(self) -> SideBySideSettings:
        """How the held-out evaluations run: this run's sampler settings and reward knobs."""
        from ..eval.side_by_side import SideBySideSettings

        return SideBySideSettings(step_cap=self.step_cap, guidance_scale=self.guidance_scale, batch=self.eval_batch,
                                  lam=self.lam, omega=self.omega, psi=self.psi, with_fidelity=self.uses_fidelity)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (checked like YAML values: names and types)."""
        return dataclasses.replace(self, **_checked(changes))

    def to_dict(self) -> dict[str, Any]:
        """Every knob by name (what checkpoints and the exported policy's rapid3_policy.json record)."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        """Write every knob with its documentation as a comment; ``from_yaml`` reads it back."""
        lines = [f"# {type(self).__doc__}", ""]
        for f in dataclasses.fields(self):
            lines += [f"# {f.metadata['doc']}", yaml.safe_dump({f.name: getattr(self, f.name)}).strip()]
        Path(path).write_text("\n".join(lines) + "\n")

    @classmethod
    def from_yaml(cls, path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (default: the defaults) with the knobs set in the YAML file at ``path``."""
        return (base or cls()).replace(**read_yaml(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The knobs a YAML file sets (a mapping of field names), checked; FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a YAML file of knobs ({' '.join(str(error).split())}).") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must map knob names to values, e.g. 'group_size: 8'.")
    return _checked(values, source=str(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per knob (``--group-size``, ``--no-step-skip``), each defaulting to "not given"."""
    group = parser.add_argument_group("training knobs (override --config and, with --resume, the run's config)")
    for f in dataclasses.fields(TrainConfig):
        kind = _base_type(_types()[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["doc"] + ("" if f.default is None else f" (default: {f.default})")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                               help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: defaults (with ``args.resume``: the run folder's config.yaml), then the YAML file
    ``args.config``, then the knobs given as flags (absent flags leave no attribute on ``args``)."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    knobs = {**(read_yaml(args.config) if args.config else {}), **flags}
    base = TrainConfig()
    if args.resume:
        saved = Path(knobs.get("out", base.out)) / CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved.parent} holds no run (no {CONFIG_FILE}); check --out.")
        base = TrainConfig.from_yaml(saved)
    return base.replace(**knobs)


def _types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(hint: Any) -> type:
    """``int`` for ``int``, ``str`` for ``str | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _checked(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """``values`` with known names and values of the right type (ints accepted as floats, "3e-4" as 3e-4)."""
    types = _types()
    checked = {}
    for name, value in values.items():
        if name not in types:
            close = difflib.get_close_matches(str(name), types, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{source}: unknown knob {name!r}.{hint} Knobs: {', '.join(types)}.")
        checked[name] = _coerce(name, value, types[name], source)
    return checked


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    optional = type(None) in typing.get_args(hint)
    kind = _base_type(hint)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    expected = kind.__name__ + (" or null" if optional else "")
    raise ValueError(f"{source}: {name} must be {expected}, got {value!r}.")
