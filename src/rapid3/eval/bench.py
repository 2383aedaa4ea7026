"""`rapid3 bench`: every method x knob on the embedded pipeline, on the same prompts and seeds.

A *method* is a value: the knob it sweeps and a factory. Most are controllers on rapid3's sampler
loop (:func:`controller_method`; a learned policy is one more, :func:`policy_method`), peers are
diffusers' own hooks on the peer harness (``baselines/peers.py``). :func:`default_methods` builds the
built-in ones; a run takes the methods it may use as an argument (``run_bench(config, methods)``), so
no registry is shared between runs. Each (method, knob) is an *entry*; the run has three passes:

1. quality: every entry generates every benchmark image (image i from noise seeded ``seed + i``),
   with its per-step cost accounting;
2. latency: a warm-up of every entry, then ``repeats`` rounds over the entries in a rotated order
   (so machine drift spreads over all of them), each timing ``timing_images`` images one at a time;
   latency is the median per image, and a speedup is a ratio of two medians from this same run;
3. metrics (see ``report.py`` for definitions), then ``results.json``, ``calibration.json``,
   ``report.md`` and the plots are written to the output folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..accel.actions import Controller
from ..accel.controllers import FullCompute, UniformSteps
from ..accel.costs import StepRecord
from ..accel.sampler import Sampler, SampleResult
from ..backbones.base import Conditioning
from ..baselines.first_block import FirstBlockCache
from ..baselines.peers import PEERS, PeerHarness, explain_failure
from ..baselines.steps import FixedIntervalCache, StaticSparse
from ..baselines.teacache import TeaCache, calibrate
from ..embedded import scenes
from ..embedded.checker import check
from ..embedded.model import GUIDANCE_SCALE, SAMPLING_STEPS, WEIGHTS_DIR, embedded_info, load_embedded
from ..embedded.pipeline import EmbeddedPipeline, initial_noise, to_uint8
from ..embedded.wordings import unseen_wordings
from ..rewards import metrics
from . import plots, report
from .evaluator import image_features, load_evaluator

Scorer = Callable[[np.ndarray, list[str]], Sequence[float]]
"""An optional quality model: uint8 images (N, H, W, 3) and their prompts -> one score per image."""

# --quick: a smoke test of every method in a few minutes on a CPU; one thread, because on a shared
# machine two threads over batch-1 work can be 5-50x slower and the timings mostly noise.
QUICK = {"prompts": 4, "singles": 2, "repeats": 2, "timing_images": 1, "calibration_images": 2, "threads": 1}
WORDINGS = ("grammar", "unseen")
CALIBRATION_SEED_OFFSET = 100_000  # calibration images never share noise with benchmark images


@dataclass
class BenchConfig:
    """Every knob of a benchmark run.

    ``prompts`` held-out captions are drawn round-robin over the multi-object kinds; ``singles``
    single-object captions are added from the train split, because the held-out split has none
    (every single-object caption is in training by design), so complexity 1 is measured too.
    """

    out: Path = Path("bench-out")
    model: Path | None = None  # an exported embedded model folder; None: the shipped weights
    quick: bool = False  # each method's short sweep (see QUICK for the other settings it changes)
    prompts: int = 200
    singles: int = 25
    seed: int = 0
    steps: int = SAMPLING_STEPS  # the full-compute sampler's steps, and every method's step cap
    guidance: float = GUIDANCE_SCALE
    batch: int = 32  # images per sampler call in the quality pass (results do not depend on it)
    methods: tuple[str, ...] | None = None  # names selected among run_bench's methods; None: all of them
    knobs: dict[str, tuple] = field(default_factory=dict)  # per-method sweep overrides
    repeats: int = 5
    timing_images: int = 3
    calibration_images: int = 4  # full-compute images to calibrate TeaCache and MagCache on
    calibration: Path | None = None  # a calibration.json of an earlier run, to reuse
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    wording: str = "grammar"  # "unseen": the same scenes in words no training caption has (embedded.wordings)

    def __post_init__(self) -> None:
        if self.wording not in WORDINGS:
            raise ValueError(f"wording must be one of {', '.join(WORDINGS)}; got {self.wording!r}.")

    @classmethod
    def create(cls, *, quick: bool = False, **given: Any) -> BenchConfig:
        """A config with the ``--quick`` presets under any explicitly given values."""
        return cls(quick=quick, **{**(QUICK if quick else {}), **{k: v for k, v in given.items() if v is not None}})


# -- what one entry produces ------------------------------------------------------------------
@dataclass
class EntryImages:
    """All benchmark images of one entry with their per-image cost accounting."""

    images: np.ndarray
    equivalent_steps: np.ndarray
    steps: np.ndarray
    flops: np.ndarray
    records: list[list[StepRecord]]


class Runner(Protocol):
    """One (method, knob): generates every benchmark image, and times one image at batch 1."""

    def generate(self) -> EntryImages:
        """Every benchmark image, with its cost accounting."""

    def time_image(self, index: int) -> float:
        """Wall-clock seconds to denoise benchmark image ``index`` alone."""


@dataclass(frozen=True)
class Method:
    """A benchmarked method: the knob it sweeps and how to build the runner for one knob value.

    ``harness`` names whose full compute its speedups are measured against: ``"sampler"`` (rapid3's
    loop) or ``"peer"`` (the peer harness), so harness overheads cancel.
    """

    name: str
    label: str
    knob: str
    values: tuple
    quick_values: tuple
    make: Callable[[Any, Bench], Runner]
    harness: str = "sampler"


Methods = dict[str, Method]
"""Methods by name: what ``rapid3 bench --methods`` selects from."""
REFERENCES = {"sampler": "full", "peer": "peer_full"}


def controller_method(name: str, label: str, knob: str, values: tuple, quick_values: tuple,
                      factory: Callable[[Any, Bench], Controller]) -> Method:
    """A sampler-loop controller as a method, e.g. a learned policy::

        controller_method("rapid3", "RAPID3", "policy", ("runs/l097",), ("runs/l097",),
                          lambda path, bench: RapidPolicy.from_pretrained(path))
    """
    return Method(name, label, knob, tuple(values), tuple(quick_values),
                  lambda value, bench: ControllerRunner(bench, factory(value, bench)))


def peer_method(peer: str, label: str, values: tuple, quick_values: tuple) -> Method:
    """A diffusers hook of ``baselines.peers.PEERS`` as a peer method."""
    return Method(peer, label, PEERS[peer].knob, tuple(values), tuple(quick_values),
                  lambda value, bench: PeerRunner(bench, peer, value), harness="peer")


# -- the two kinds of runner --------------------------------------------------------------------
class ControllerRunner:
    """A controller on rapid3's sampler loop, batched (an image does not depend on its batch)."""

    def __init__(self, bench: Bench, controller: Controller) -> None:
        self.bench, self.controller = bench, controller
        self.sampler = Sampler(bench.pipe.backbone, step_cap=bench.config.steps)

    def _sample(self, index: torch.Tensor) -> SampleResult:
        b = self.bench
        return self.sampler.sample(b.noise[index], b.cond.select(index), self.controller,
                                   uncond=b.uncond.select(index), guidance_scale=b.config.guidance)

    def generate(self) -> EntryImages:
        chunks = torch.arange(len(self.bench.specs)).split(self.bench.config.batch)
        results = [self._sample(index) for index in chunks]
        return EntryImages(
            images=np.concatenate([to_uint8(r.latents) for r in results]),
            equivalent_steps=torch.cat([r.stats.equivalent_steps for r in results]).numpy(),
            steps=torch.cat([r.stats.steps for r in results]).numpy(),
            flops=torch.cat([r.stats.flops for r in results]).numpy(),
            records=[records for r in results for records in r.stats.records])

    def time_image(self, index: int) -> float:
        tic = time.perf_counter()
        self._sample(torch.tensor([index]))
        return time.perf_counter() - tic


class PeerRunner:
    """A diffusers hook on the peer harness, image by image (``peer=None``: the harness's full compute)."""

    def __init__(self, bench: Bench, peer: str | None, value: Any) -> None:
        self.bench = bench
        bench.prepare_peer(peer)
        self.model = bench.harness.hooked(peer, value)

    def generate(self) -> EntryImages:
        b = self.bench
        run = b.harness.run(self.model, b.noise, b.cond, b.uncond)
        return EntryImages(to_uint8(run.latents), run.stats.equivalent_steps.numpy(), run.stats.steps.numpy(),
                          run.stats.flops.numpy(), run.stats.records)

    def time_image(self, index: int) -> float:
        b, i = self.bench, torch.tensor([index])
        tic = time.perf_counter()
        b.harness.run(self.model, b.noise[i], b.cond.select(i), b.uncond.select(i), count=False)
        return time.perf_counter() - tic


# -- the built-in methods -------------------------------------------------------------------------
def default_methods() -> Methods:
    """The built-in methods, the two references (full compute on each harness) included, by name."""
    methods = [
        controller_method("full", "full compute", "-", (None,), (None,), lambda value, bench: FullCompute()),
        controller_method("uniform", "uniform steps", "steps", (20, 14, 10, 7), (14, 7),
                          lambda steps, bench: UniformSteps(steps)),
        controller_method("fora", "FORA / Δ-DiT", "interval", (2, 3, 4, 5), (2, 4),
                          lambda interval, bench: FixedIntervalCache(interval)),
        controller_method("teacache", "TeaCache", "threshold", (0.05, 0.1, 0.2, 0.4), (0.1, 0.3),
                          lambda threshold, bench: TeaCache(threshold, bench.teacache_coefficients())),
        controller_method("first_block", "FirstBlockCache-style", "threshold", (0.03, 0.06, 0.1, 0.2),
                          (0.05, 0.15), lambda threshold, bench: FirstBlockCache(threshold)),
        controller_method("static_sparse", "static sparse attention", "level", (1, 2, 3), (1, 3),
                          lambda level, bench: StaticSparse(level)),
        Method("peer_full", "full compute (peer harness)", "-", (None,), (None,),
               lambda value, bench: PeerRunner(bench, None, None), harness="peer"),
        peer_method("mag_cache", "diffusers MagCache", (0.02, 0.06, 0.12, 0.24), (0.06, 0.24)),
        peer_method("taylorseer_cache", "diffusers TaylorSeer", (2, 3, 5), (3,)),
        peer_method("pyramid_attention_broadcast", "diffusers PAB", (2, 3, 4), (2,)),
        peer_method("first_block_cache", "diffusers FirstBlockCache", (0.05, 0.1, 0.2), (0.1,)),
    ]
    return {method.name: method for method in methods}


# -- the benchmark ----------------------------------------------------------------------------------
class Bench:
    """The shared state of a run: pipeline, peer harness, prompts, noise, calibration."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.pipe = EmbeddedPipeline.from_pretrained(config.model)
        self.harness = PeerHarness(load_embedded(config.model)[0], self.pipe.backbone, num_steps=config.steps,
                                   guidance_scale=config.guidance)
        self.specs = scenes.evaluation_prompts(config.prompts, config.singles)
        if config.wording == "unseen":
            self.specs = unseen_wordings(self.specs)
        self.cond, self.uncond = self.pipe.encode([s.caption for s in self.specs])
        self.noise = initial_noise(len(self.specs), config.seed)
        self.calibration: dict[str, list[float]] = {}
        if config.calibration is not None:
            self.calibration = json.loads(Path(config.calibration).read_text())
            if "mag_cache" in self.calibration:
                self.harness.calibration["mag_cache"] = self.calibration["mag_cache"]

    def _calibration_inputs(self) -> tuple[torch.Tensor, Conditioning, Conditioning]:
        train = scenes.prompt_splits()["train"]
        order = np.random.default_rng(1).permutation(len(train))[: self.config.calibration_images]
        cond, uncond = self.pipe.encode([train[i].caption for i in order])
        return initial_noise(len(order), self.config.seed + CALIBRATION_SEED_OFFSET), cond, uncond

    def teacache_coefficients(self) -> list[float]:
        """TeaCache's rescaling polynomial for this model (calibrated once, on train-split prompts)."""
        if "teacache" not in self.calibration:
            noise, cond, uncond = self._calibration_inputs()
            sampler = Sampler(self.pipe.backbone, step_cap=self.config.steps)
            self.calibration["teacache"] = calibrate(sampler, noise, cond, uncond=uncond,
                                                     guidance_scale=self.config.guidance).tolist()
        return self.calibration["teacache"]

    def prepare_peer(self, peer: str | None) -> None:
        """Calibrate a peer that needs it, once: MagCache's magnitude ratios, by its own calibration
        mode, on the same calibration images as TeaCache."""
        if peer == "mag_cache" and "mag_cache" not in self.harness.calibration:
            self.calibration["mag_cache"] = self.harness.calibrate_mag_cache(*self._calibration_inputs())


@dataclass
class Entry:
    """One (method, knob value) of a run and what came of it."""

    method: Method
    value: Any
    runner: Runner | None = None
    generation: EntryImages | None = None
    seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def key(self) -> str:
        return self.method.name if self.value is None else f"{self.method.name}={self.value}"


def selected_methods(config: BenchConfig, methods: Methods) -> list[Method]:
    """The methods of ``methods`` to run (``config.methods``, default all), references first: sampler full
    compute always, the peer harness's when any peer runs."""
    names = list(methods) if config.methods is None else list(config.methods)
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(methods)}")
    chosen = [methods[n] for n in names]
    harnesses = {m.harness for m in chosen} | {"sampler"}
    references = [methods[REFERENCES[h]] for h in ("sampler", "peer") if h in harnesses]
    return references + [m for m in chosen if m not in references]


def _attempt(entry: Entry, action: Callable[..., Any], *args: Any) -> Any:
    """``action(*args)`` for an entry; a failure is recorded on the entry (a peer that cannot run on
    this backbone), not raised, so the rest of the benchmark goes on."""
    if entry.error is not None:
        return None
    try:
        return action(*args)
    except Exception as error:  # noqa: BLE001 -- any failure of a method is a result to report
        entry.error = f"{type(error).__name__}: {error}"
        return None


def run_bench(config: BenchConfig, methods: Methods | None = None, *, reward: Scorer | None = None,
              discriminator: Scorer | None = None, progress: bool = True) -> dict:
    """Run the benchmark over ``methods`` (default: :func:`default_methods`; ``config.methods`` selects among
    them); write results.json, calibration.json, report.md and plots to ``config.out``."""
    started = time.perf_counter()
    methods = selected_methods(config, default_methods() if methods is None else methods)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    config.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(config)
    sweep = lambda m: config.knobs.get(m.name, m.quick_values if config.quick else m.values)  # noqa: E731
    entries = [Entry(m, v) for m in methods for v in sweep(m)]
    for entry in tqdm(entries, desc="quality pass", unit="entry", disable=not progress):
        entry.runner = _attempt(entry, entry.method.make, entry.value, bench)
        entry.generation = _attempt(entry, lambda runner: runner.generate(), entry.runner)
    _time_entries([e for e in entries if e.error is None], bench, progress)
    results = summarize(bench, entries, reward=reward, discriminator=discriminator)
    results["bench_seconds"] = time.perf_counter() - started
    write_outputs(config.out, bench, entries, results)
    return results


def timing_indices(specs: list[scenes.SceneSpec], count: int) -> list[int]:
    """``count`` benchmark images to time, cycling through the complexities (1, 2, 3)."""
    by_complexity = {c: [i for i, s in enumerate(specs) if s.complexity == c] for c in (1, 2, 3)}
    order = [i for group in zip(*[by_complexity[c] or [None] for c in (1, 2, 3)]) for i in group if i is not None]
    rest = [i for i in range(len(specs)) if i not in order]
    return (order + rest)[:count]


def _time_entries(entries: list[Entry], bench: Bench, progress: bool) -> None:
    """Warm-up, then rounds over the entries in rotated order; per-image seconds on each entry."""
    indices = timing_indices(bench.specs, bench.config.timing_images)
    for entry in entries:
        _attempt(entry, lambda runner: runner.time_image(indices[0]), entry.runner)
    live = [e for e in entries if e.error is None]
    rounds = tqdm(range(bench.config.repeats), desc="latency rounds", unit="round", disable=not progress)
    for r in rounds:
        for entry in live[r % len(live):] + live[: r % len(live)]:
            entry.seconds += [entry.runner.time_image(i) for i in indices]


# -- metrics ----------------------------------------------------------------------------------------
@dataclass
class Scoring:
    """What every entry is scored against: the prompts, the full-compute images of the same seeds,
    the evaluator's features of those and of exact renders, and the optional quality models."""

    specs: list[scenes.SceneSpec]
    reference: np.ndarray
    evaluator: Any
    features: dict[str, np.ndarray]
    reward: Scorer | None = None
    discriminator: Scorer | None = None

    @classmethod
    def build(cls, bench: Bench, reference: np.ndarray, **scorers: Scorer | None) -> Scoring:
        evaluator = load_evaluator()
        renders = np.stack([scenes.render(scenes.place(spec, np.random.default_rng(bench.config.seed + i)))
                            for i, spec in enumerate(bench.specs)])
        features = {"renders": image_features(renders, evaluator), "full": image_features(reference, evaluator)}
        return cls(bench.specs, reference, evaluator, features, **scorers)

    def by_complexity(self, values: np.ndarray, reduce: Callable[[np.ndarray], Any] = np.mean) -> dict[int, float]:
        complexity = np.array([s.complexity for s in self.specs])
        return {int(c): float(reduce(values[complexity == c])) for c in np.unique(complexity)}

    def score(self, gen: EntryImages) -> dict:
        """Every metric of one entry's images (definitions in report.py)."""
        checks = [check(image, spec) for image, spec in zip(gen.images, self.specs)]
        passed = np.array([c.passed for c in checks], dtype=float)
        own = image_features(gen.images, self.evaluator)
        psnr = np.minimum(metrics.psnr(gen.images, self.reference), report.PSNR_CAP)
        prompts = [s.caption for s in self.specs]
        return {
            "accuracy": float(passed.mean()), "accuracy_by_complexity": self.by_complexity(passed),
            "checker_score": float(np.mean([c.score for c in checks])),
            "psnr": float(psnr.mean()), "ssim": float(metrics.ssim(gen.images, self.reference).mean()),
            "fd_renders": metrics.frechet_distance(own, self.features["renders"]),
            "fd_full": metrics.frechet_distance(own, self.features["full"]),
            "reward": _score(self.reward, gen.images, prompts),
            "discriminator": _score(self.discriminator, gen.images, prompts),
            "steps": float(gen.steps.mean()), "equivalent_steps": float(gen.equivalent_steps.mean()),
            "equivalent_steps_by_complexity": self.by_complexity(gen.equivalent_steps),
            "equivalent_steps_std_by_complexity": self.by_complexity(gen.equivalent_steps, np.std),
            "gflops": float(gen.flops.mean() / 1e9),
            "per_image": {"equivalent_steps": gen.equivalent_steps.tolist(), "passed": passed.tolist(),
                          "psnr": psnr.tolist()},
            "action_maps": {str(i): action_spans(gen.records[i]) for i in example_indices(self.specs)},
        }


def summarize(bench: Bench, entries: list[Entry], *, reward: Scorer | None, discriminator: Scorer | None) -> dict:
    """Every entry's metrics, against the full-compute images of the same seeds."""
    reference = next(e for e in entries if e.method.name == "full").generation
    scoring = Scoring.build(bench, reference.images, reward=reward, discriminator=discriminator)
    rows = []
    for entry in entries:
        row = {"method": entry.method.name, "label": entry.method.label, "knob": entry.method.knob,
               "value": entry.value, "harness": entry.method.harness, "key": entry.key}
        if entry.error is not None:
            row.update(status="failed", error=entry.error, explanation=_explain(entry, bench))
        else:
            row.update(status="ok", metrics=scoring.score(entry.generation), latency_samples=entry.seconds)
        rows.append(row)
    _speedups(rows, entries)
    return {"config": _jsonable(dataclasses.asdict(bench.config)), "model": _model_info(bench.config.model),
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "processor": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available()},
            "calibration": bench.calibration,
            "prompts": [{"caption": s.caption, "kind": s.kind, "complexity": s.complexity,
                         "split": "train" if s.kind == "single" else "heldout", "seed": bench.config.seed + i}
                        for i, s in enumerate(bench.specs)],
            "timing_images": timing_indices(bench.specs, bench.config.timing_images),
            "entries": rows}


def _score(scorer: Scorer | None, images: np.ndarray, prompts: list[str]) -> float | None:
    return None if scorer is None else float(np.mean(np.asarray(scorer(images, prompts), dtype=float)))


def _speedups(rows: list[dict], entries: list[Entry]) -> None:
    """Latency = median seconds per image; speedups against the same harness's full compute."""
    by_name = {r["method"]: r for r in rows}
    for row, entry in zip(rows, entries):
        if row["status"] != "ok":
            continue
        ref = by_name.get(REFERENCES[row["harness"]])
        m = row["metrics"]
        m["latency_s"] = statistics.median(entry.seconds) if entry.seconds else None
        m["latency_range_s"] = [min(entry.seconds), max(entry.seconds)] if entry.seconds else None
        ok = ref is not None and ref["status"] == "ok"
        ref_latency = ref["metrics"].get("latency_s") if ok else None
        m["speedup_latency"] = ref_latency / m["latency_s"] if ref_latency and m["latency_s"] else None
        m["speedup_flops"] = ref["metrics"]["gflops"] / m["gflops"] if ok else None


def action_spans(records: list[StepRecord]) -> list[list]:
    """Per executed step: [t, next_t, action, compute fraction]; the action is "compute", "reuse",
    "sparse N" or "partial" (a peer hook that skipped part of the blocks' work)."""
    def action(r: StepRecord) -> str:
        if r.reuse:
            return "reuse"
        if r.level > 0:
            return f"sparse {r.level}"
        return "partial" if r.equivalent_steps < 0.95 else "compute"
    return [[r.t, r.next_t, action(r), r.equivalent_steps] for r in records]


def example_indices(specs: list[scenes.SceneSpec]) -> list[int]:
    """One image per complexity, shown in the action maps."""
    return timing_indices(specs, 3)


def _explain(entry: Entry, bench: Bench) -> str | None:
    return explain_failure(entry.method.name, bench.harness.transformer, entry.error)


def _model_info(path: Path | None) -> dict:
    return {"path": str(Path(path) if path is not None else WEIGHTS_DIR), **embedded_info(path)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def write_outputs(out: Path, bench: Bench, entries: list[Entry], results: dict) -> None:
    """results.json, calibration.json, the plots and report.md."""
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    (out / "calibration.json").write_text(json.dumps(bench.calibration, indent=1) + "\n")
    examples = example_indices(bench.specs)
    thumbnails = {e.key: e.generation.images[examples] for e in entries if e.generation is not None}
    figures = plots.write_all(out, results, thumbnails, examples)
    (out / "report.md").write_text(report.render(results, figures))


# -- command line -------------------------------------------------------------------------------------
def load_scorer(spec: str | None) -> Scorer | None:
    """``"package.module:function"`` -> that callable (a reward model or discriminator hook)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"expected MODULE:FUNCTION for a scorer, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def policy_method(name: str, label: str, policies: Sequence[str | Path]) -> Method:
    """Trained policies (names of shipped ones or folders) as one method swept over its runs: its knob is
    the discount λ each was trained with when they all differ in it, else the folder."""
    from ..policy.shipped import load_policy, policy_folder, training_info

    folders = [policy_folder(p) for p in policies]
    lams = [training_info(f).get("train_config", {}).get("lam") for f in folders]
    by_lam = None not in lams and len(set(lams)) == len(lams)
    values = tuple(lams) if by_lam else tuple(str(f) for f in folders)
    folder_of = dict(zip(values, folders))

    def policy(value: Any, bench: Bench) -> Controller:
        loaded = load_policy(folder_of[value])
        loaded.check_backbone(bench.pipe.backbone)
        return loaded

    return controller_method(name, label, "lam" if by_lam else "policy", values, values, policy)


def policy_methods(policies: str | None, tpdm: str | None) -> Methods:
    """``--policy`` (comma-separated; default: the shipped default policy, when there is one) as method
    "rapid3" and ``--tpdm`` (step-only policies) as "tpdm", those given."""
    from ..policy.shipped import SHIPPED_POLICIES

    if policies is None and (SHIPPED_POLICIES / "default" / "config.json").is_file():
        policies = "default"
    given = (("rapid3", "RAPID3 policy", policies), ("tpdm", "TPDM (step-only policy)", tpdm))
    return {name: policy_method(name, label, paths.split(",")) for name, label, paths in given if paths}


def parse_sweeps(specs: list[str] | None, methods: Methods) -> dict[str, tuple]:
    """``["fora=2,3", "teacache=0.1,0.4"]`` -> {method: knob values}, each value of the type of the
    method's own defaults; ValueError naming the method or value that is wrong."""
    sweeps = {}
    for spec in specs or []:
        name, _, values = spec.partition("=")
        if name not in methods or not values:
            raise ValueError(f"--sweep expects METHOD=V1,V2,... with a registered method ({', '.join(methods)}); "
                             f"got {spec!r}.")
        kind = type(methods[name].values[0])
        try:
            sweeps[name] = tuple(kind(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: {name}'s {methods[name].knob} takes {kind.__name__} values.") from None
    return sweeps


def run_cli(args: Any) -> int:
    """``rapid3 bench``: build the config from parsed arguments, run, print where the report is."""
    learned = policy_methods(args.policy, args.tpdm)
    methods = {**default_methods(), **learned}
    if args.list_methods:
        for m in methods.values():
            print(f"{m.name:28s} {m.label} ({m.knob}: {', '.join(map(str, m.values))}; quick: "
                  f"{', '.join(map(str, m.quick_values))})")
        return 0
    selected = tuple(args.methods.split(",")) if args.methods else None
    if selected is not None:  # the policies given with --policy / --tpdm run whatever --methods says
        selected = (*selected, *(name for name in learned if name not in selected))
    config = BenchConfig.create(quick=args.quick, out=args.out, model=args.model, prompts=args.prompts,
                                singles=args.singles, seed=args.seed, repeats=args.repeats, steps=args.steps,
                                guidance=args.guidance, timing_images=args.timing_images, batch=args.batch,
                                calibration=args.calibration, threads=args.threads, methods=selected,
                                wording=args.wording,
                                knobs=parse_sweeps(args.sweep, methods))
    results = run_bench(config, methods, reward=load_scorer(args.reward),
                        discriminator=load_scorer(args.discriminator))
    failed = [r["key"] for r in results["entries"] if r["status"] != "ok"]
    print(f"wrote {config.out / 'report.md'} ({len(results['entries'])} entries, {results['bench_seconds']:.0f} s)"
          + (f"; could not run: {', '.join(failed)} (see the report)" if failed else ""))
    return 0
