import json

from multifusion.cli import main


def test_demo_writes_images_grid_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {(r["app"], r["method"]) for r in report["rows"]} >= {("base", "single"), ("fine-grained", "average")}
    for row in report["rows"]:
        assert set(row) == {"app", "method", "models", "seeds", "metrics"} and row["seeds"] == 4
    assert "tiny randomly initialised" in (out / "report.md").read_text()
    assert (out / "grid.png").stat().st_size > 0
    assert len(list(out.glob("*-s*.png"))) == 12
