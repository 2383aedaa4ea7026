"""The embedded model's evaluation script, on a tiny exported model."""

from __future__ import annotations

import json

from PIL import Image
from tiny_pipelines import export_tiny_embedded

from rapid3.embedded.evaluate import main


def test_evaluation_writes_accuracy_by_complexity_and_grids(tmp_path):
    model = export_tiny_embedded(tmp_path / "model")
    results = main(["--model", str(model), "--prompts", "5", "--singles", "2", "--steps", "3", "2",
                    "--batch", "4", "--out", str(tmp_path / "eval")])
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert set(saved) == {"3", "2"} and saved["3"]["n"] == 7
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and set(r["by_complexity"]) <= {1, 2, 3}
        assert "single" in r["by_kind"]
        assert set(r["relations"]) == {"holds", "reversed", "other", "missing"}
        assert abs(sum(r["relations"].values()) - 1.0) < 1e-9  # the 5 held-out prompts include a relation
    assert Image.open(tmp_path / "eval" / "grid_3steps.png").width > 32 * 4 * 3
