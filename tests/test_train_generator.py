"""The embedded model's training script on a tiny config: steps, checkpoint, resume, export, load."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sigterm import sigterm_during

from rapid3.common.checkpoint import CheckpointError, save_checkpoint
from rapid3.embedded.model import embedded_info, load_embedded
from rapid3.embedded.pipeline import EmbeddedPipeline
from rapid3.embedded.scenes import IMAGE_SIZE, parse_caption
from rapid3.embedded.text_encoder import MiniLMTextEncoder, add_token_positions, ordered_pairs
from rapid3.embedded.train_generator import (
    CHECKPOINT,
    GeneratorTrainConfig,
    batches,
    main,
    parse_args,
    render_batch,
    train,
    training_captions,
    training_times,
)

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16)


@pytest.fixture(scope="module")
def encoder() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def _config(out: Path, steps: int, **kw) -> GeneratorTrainConfig:
    return GeneratorTrainConfig(out=out, steps=steps, batch=4, sample_every=2, sample_steps=2, log_every=1, model=TINY, **kw)


def test_cli_defaults() -> None:
    cfg = parse_args(["--out", "x", "--resume", "--steps", "7", "--export", "y"])
    assert (cfg.out, cfg.resume, cfg.steps, cfg.export, cfg.batch, cfg.ema) == (Path("x"), True, 7, Path("y"), 64, 0.999)
    for flag in ("token_positions", "ordered_pairs", "canonical_relations"):
        assert getattr(cfg, flag) and not getattr(parse_args(["--out", "x", "--no-" + flag.replace("_", "-")]), flag)


def test_kind_weights_and_time_mean(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_args(["--out", "x", "--kind-weight", "relation=1", "--kind-weight", "single=0", "--time-mean", "1"])
    assert cfg.kind_weights["relation"] == 1.0 and cfg.kind_weights["single"] == 0.0 and cfg.time_mean == 1.0
    _, captions = render_batch(0, 1, 32, {"relation": 1.0})
    assert all(parse_caption(c).kind == "relation" for c in captions)
    torch.manual_seed(0)
    assert training_times(4000).median() < 0.55 < training_times(4000, time_mean=1.0).median()
    for bad in ("colour=1", "relation=x", "relation=-1"):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", "--kind-weight", bad])
        assert f"--kind-weight {bad}: give KIND=W" in capsys.readouterr().err


def test_train_resume_export_load(tmp_path: Path, encoder: MiniLMTextEncoder) -> None:
    out = tmp_path / "run"
    first = train(_config(out, 2), encoder)
    assert first["step"] == 2 and (out / CHECKPOINT).is_file()
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["step_0000002.png"]

    resumed = train(replace(_config(out, 3, export=tmp_path / "export"), resume=True), encoder)
    assert resumed["step"] == 3
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == [1, 2, 3]

    # the same three steps without interruption give the same weights: resume restores every RNG
    straight = train(_config(tmp_path / "straight", 3), encoder)
    for a, b in zip(resumed["model"].parameters(), straight["model"].parameters()):
        assert torch.equal(a, b)

    info = embedded_info(tmp_path / "export")
    assert info["token_positions"] is True and info["ordered_pairs"] is True and info["canonical_relations"] is True
    assert embedded_info(tmp_path / "export")["images_seen"] == 3 * 4
    pipe = EmbeddedPipeline.from_pretrained(tmp_path / "export", encoder=encoder)
    cond, _ = pipe.encode(["a red circle"])  # the sampler conditions as training did
    tokens, pooled = encoder.encode(["a red circle"])
    assert torch.equal(cond.per_sample["encoder_hidden_states"], add_token_positions(tokens))
    assert torch.equal(cond.per_sample["pooled_projections"], torch.cat([pooled, ordered_pairs(tokens)], -1))
    mirrored, canonical = (pipe.encode([c])[0].per_sample["encoder_hidden_states"]
                           for c in ("a red circle right of a blue square", "a blue square left of a red circle"))
    assert torch.equal(mirrored, canonical)
    transformer, scheduler = load_embedded(tmp_path / "export")
    assert transformer.dtype == torch.float32 and scheduler.config.shift == 1.0
    for name, p in resumed["ema"].state_dict().items():
        assert torch.allclose(transformer.state_dict()[name], p.half().float())
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    v = transformer(x, **cond.per_sample, timestep=torch.tensor([500.0]),
                    return_dict=False)[0]
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_negative_workers_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--workers", "-1"])
    assert "--workers -1" in capsys.readouterr().err


def test_batches_do_not_depend_on_workers() -> None:
    inline, pooled = batches(3, 4, start=5, workers=0), batches(3, 4, start=5, workers=2)
    try:
        for _ in range(3):
            (a, caps_a), (b, caps_b) = next(inline), next(pooled)
            assert torch.equal(a, b) and caps_a == caps_b
        # a run resumed at step 6 sees the batch step 6 saw
        assert next(batches(3, 4, start=6, workers=0))[1] != next(batches(3, 4, start=5, workers=0))[1]
    finally:
        inline.close()
        pooled.close()


def test_precomputed_text_encodings(tmp_path: Path, encoder: MiniLMTextEncoder) -> None:
    path = tmp_path / "enc.safetensors"
    with pytest.raises(SystemExit) as done:
        parse_args(["--out", str(tmp_path), "--save-text-encodings", str(path)])
    assert done.value.code == 0
    cfg = replace(_config(tmp_path / "run", 1), text_encodings=path)
    assert train(cfg)["step"] == 1  # MiniLM not needed: the run reads every caption it uses from the file
    assert len(set(training_captions())) > 3000


def test_minutes_limit_stops_and_checkpoints(tmp_path: Path, encoder: MiniLMTextEncoder) -> None:
    run = train(replace(_config(tmp_path, 1000), minutes=0.002), encoder)
    assert 0 < run["step"] < 1000 and (tmp_path / CHECKPOINT).is_file()


def test_init_from_export(tmp_path: Path, encoder: MiniLMTextEncoder) -> None:
    train(_config(tmp_path / "first", 2, export=tmp_path / "export"), encoder)
    exported, _ = load_embedded(tmp_path / "export")
    cfg = replace(_config(tmp_path / "second", 2, lr=0.0), init_from=tmp_path / "export")
    run = train(cfg, encoder)
    assert run["step"] == 2  # the export's step: nothing left to do
    run = train(replace(cfg, out=tmp_path / "third", steps=3, batch=2), encoder)
    assert run["step"] == 3 and run["images_seen"] == 2 * 4 + 2  # counted across batch sizes
    for name, p in run["model"].state_dict().items():  # lr 0: one step leaves the exported weights
        assert torch.equal(p, exported.state_dict()[name])


@pytest.mark.parametrize("flag, option", [("token_positions", "--no-token-positions"),
                                          ("ordered_pairs", "--no-ordered-pairs"),
                                          ("canonical_relations", "--no-canonical-relations")])
def test_resume_keeps_the_caption_conditioning(tmp_path: Path, encoder: MiniLMTextEncoder, flag: str,
                                               option: str) -> None:
    train(replace(_config(tmp_path, 1), **{flag: False}), encoder)
    with pytest.raises(CheckpointError, match=f"trained without {flag.replace('_', ' ')}; resume it with {option}"):
        train(replace(_config(tmp_path, 2), resume=True), encoder)


def test_init_from_an_export_without_ordered_pairs(tmp_path: Path, encoder: MiniLMTextEncoder) -> None:
    train(_config(tmp_path / "old", 1, ordered_pairs=False, export=tmp_path / "export"), encoder)
    old, _ = load_embedded(tmp_path / "export")
    run = train(replace(_config(tmp_path / "new", 1, export=tmp_path / "new_export"), init_from=tmp_path / "export"),
                encoder)
    widened = run["model"].eval()
    assert widened.config.pooled_projection_dim == 2 * old.config.pooled_projection_dim
    # the pair columns start at zero: the widened model draws what the export drew
    tokens, pooled = encoder.encode(["a red circle left of a blue square"])
    tokens = add_token_positions(tokens)
    x, t = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([500.0])
    want = old(x, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    with torch.no_grad():
        got = widened(x, encoder_hidden_states=tokens, timestep=t, return_dict=False,
                      pooled_projections=torch.cat([pooled, ordered_pairs(tokens)], -1))[0]
    assert torch.allclose(got, want, atol=1e-5)
    # the other way, a model would lose an input it was trained on: refused in one line
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "narrow"), "--init-from", str(tmp_path / "new_export"), "--no-ordered-pairs"])
    assert "was trained with ordered pairs; start from it without --no-ordered-pairs" in str(exit_info.value.code)


@pytest.mark.parametrize("content, message", [
    (None, "no checkpoint at .*checkpoint.pt; start the run without --resume"),
    (b"PK\x03\x04 torn", "checkpoint.pt is corrupt or truncated"),
    ("grpo", "not a rapid3 training checkpoint of this kind .*rapid3-grpo-checkpoint/1"),
])
def test_cli_bad_resume_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          content: bytes | str | None, message: str) -> None:
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
        if content == "grpo":  # another trainer's checkpoint in the folder
            save_checkpoint(run / CHECKPOINT, {"step": 1})
        else:
            (run / CHECKPOINT).write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(run), "--resume"])
    assert re.search(message, str(exit_info.value.code)), exit_info.value.code
    assert str(exit_info.value.code).startswith("python -m rapid3.embedded.train_generator: error:")
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == [CHECKPOINT]  # nothing written


def test_load_embedded_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="rapid3 embedded train-generator"):
        load_embedded(tmp_path)


def test_sigterm_stops_after_the_step_and_checkpoints(tmp_path: Path, encoder: MiniLMTextEncoder,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import rapid3.embedded.train_generator as program

    monkeypatch.setattr(program, "train_step", sigterm_during(program.train_step))
    run = train(_config(tmp_path / "run", 5, export=tmp_path / "export"), encoder)
    assert run["step"] == 1 and (tmp_path / "run" / CHECKPOINT).is_file()
    assert embedded_info(tmp_path / "export")["step"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
