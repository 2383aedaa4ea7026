"""The embedded model's evaluation script, on a tiny exported model."""

from __future__ import annotations

import json

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image

from rapid3.embedded.evaluate import main
from rapid3.embedded.model import embedded_scheduler_config, embedded_transformer_config


def test_evaluation_writes_accuracy_by_complexity_and_grids(tmp_path):
    model = tmp_path / "model"
    torch.manual_seed(0)
    SD3Transformer2DModel(**embedded_transformer_config(num_layers=1)).to(torch.float16).save_pretrained(model)
    FlowMatchEulerDiscreteScheduler(**embedded_scheduler_config()).save_pretrained(model)
    results = main(["--model", str(model), "--prompts", "5", "--singles", "2", "--steps", "3", "2",
                    "--batch", "4", "--out", str(tmp_path / "eval")])
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert set(saved) == {"3", "2"} and saved["3"]["n"] == 7
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and set(r["by_complexity"]) <= {1, 2, 3}
        assert "single" in r["by_kind"]
    assert Image.open(tmp_path / "eval" / "grid_3steps.png").width > 32 * 4 * 3
