"""Progress in a rule's log: one line per update, with count, rate and ETA; the run's last words."""

import io

from memctl.progress import tqdm


def test_a_log_file_gets_whole_lines_with_rate_and_eta(monkeypatch):
    monkeypatch.setenv("MEMCTL_PROGRESS_INTERVAL", "0")
    log = io.StringIO()  # not a terminal, like a rule's log
    for _ in tqdm(range(5), desc="pretrain", file=log, unit="it"):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert lines[-1].startswith("pretrain: 100%") and "5/5" in lines[-1] and "it/s" in lines[-1]
    assert all(line.startswith("pretrain:") for line in lines)
    assert any("<" in line for line in lines)  # elapsed<remaining: the ETA


def test_updates_are_spaced_by_the_interval(monkeypatch):
    monkeypatch.setenv("MEMCTL_PROGRESS_INTERVAL", "3600")
    log = io.StringIO()
    for _ in tqdm(range(1000), desc="x", file=log):
        pass
    assert len(log.getvalue().strip().splitlines()) <= 2  # the first and the final line only


def test_the_finished_run_says_where_the_results_are(tmp_path):
    from types import SimpleNamespace

    from memctl.plan import results_summary

    (tmp_path / "results.md").write_text("x")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "table.md").write_text("x")
    text = results_summary(SimpleNamespace(results=str(tmp_path)))
    assert f"results in {tmp_path}/" in text
    assert f"{tmp_path}/results.md" in text and f"{tmp_path}/masks/table.md" in text
    assert "curvature.md" not in text  # only what exists
