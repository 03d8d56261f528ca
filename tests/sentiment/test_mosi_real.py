"""One training epoch of the bundle on the real CMU-MOSI utterance features, when they are present."""

from __future__ import annotations

import json

import pytest
from monai.bundle import ConfigParser

from tests.sentiment.helpers import MOSI_BUNDLE, REAL_PKL, TRAIN

pytestmark = pytest.mark.skipif(
    not REAL_PKL.is_file(),
    reason=f"real CMU-MOSI features not found at {REAL_PKL} (set MOSI_PKL to the MMSA pickle to run this test)",
)


@pytest.mark.usefixtures("process_state_restored")  # the bundle's setup of its process, run in this one
def test_one_gmd_epoch_on_real_features(tmp_path):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(MOSI_BUNDLE), "data_path": str(REAL_PKL), "trust_pickle": True,
                   "output_dir": str(tmp_path), "max_epochs": 1, "strategy": "gmd", "diagnostics_interval": 10})
    for expr in parser.get_parsed_content("initialize"):
        pass  # the items are evaluated while parsing
    parser.get_parsed_content("train#trainer").run()

    assert len(parser.get_parsed_content("train#dataset")) == 1272
    report = json.loads((tmp_path / "validation" / "subset_metrics.json").read_text())
    assert len(report["subsets"]) == 7 and all(row["n"] == 172 for row in report["subsets"].values())
    # one epoch already learns sentiment from text: far better than the constant-prediction MAE (~1.43)
    assert report["subsets"]["text"]["MAE"] < 1.2 and report["subsets"]["text"]["Acc2"] > 0.7
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "model_final.pt").is_file()
    diagnostics = [json.loads(line) for line in (tmp_path / "gmd_diagnostics.jsonl").read_text().splitlines()]
    assert diagnostics and len(diagnostics[0]["subsets"]) == 7
