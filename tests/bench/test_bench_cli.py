"""`pdserve bench` end to end against the fake server: flags, exit codes, files written."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from pdserve.bench.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(url: str, out_dir, *extra: str) -> list[str]:
    return [
        "--base-url",
        url,
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        "--random-output-len",
        "4",
        "--random-range-ratio",
        "1",
        "--num-prompts",
        "4",
        "--output-dir",
        str(out_dir),
        "--disable-tqdm",
        *extra,
    ]


def test_writes_json_table_and_plots(fake_server, tmp_path, capsys):
    rc = main(
        _args(fake_server.url, tmp_path, "--slo-ttft-ms", "500", "--slo-tpot-ms", "100", "--warmup-requests", "2")
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out
    assert "Successful requests:                     4" in out
    assert "Prefill mean (ms):" in out  # the fake server reports phase times
    (json_path,) = tmp_path.glob("pdserve_random_*.json")
    doc = json.loads(json_path.read_text())
    assert doc["format"] == "pdserve-bench/1"
    assert doc["config"]["num_prompts"] == 4 and doc["config"]["request_rates"] == ["inf"]
    assert doc["server"]["models"] == ["fake-model"]
    (run,) = doc["runs"]
    m = run["metrics"]
    assert (m["completed"], m["failed"]) == (4, 0)
    assert m["slo_attainment"] == 1.0 and m["goodput"] > 0
    assert m["tpot_ms"]["median"] == pytest.approx(40, abs=8)
    assert len(run["requests"]) == 4  # warm-up excluded
    # token counts come from the model's tokenizer: the prompts are 16 tokens long
    assert all(r["prompt_len"] == 16 and r["output_len"] == 4 for r in run["requests"])
    assert len(fake_server.received) == 6
    png = json_path.with_name(json_path.stem + "_cdf.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_sweep_plot_and_compare(fake_server, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert (
        main(
            _args(
                fake_server.url,
                tmp_path,
                "--request-rate",
                "5,20",
                "--output-file",
                str(a),
                "--slo-ttft-ms",
                "300",
                "--warmup-requests",
                "0",
            )
        )
        == 0
    )
    assert (tmp_path / "a_sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert (
        main(_args(fake_server.url, tmp_path, "--backend", "openai-chat", "--output-file", str(b), "--no-plots")) == 0
    )
    assert not (tmp_path / "b_cdf.png").exists()
    assert fake_server.received[-1][1]["model"] == "fake-model"  # found through /v1/models
    doc = json.loads(a.read_text())
    assert [r["request_rate"] for r in doc["runs"]] == ["5", "20"]
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert "a@5" in header and "a@20" in header and header.rstrip().endswith("b")
    assert "TTFT p99 (ms)" in table and "SLO attainment (%)" in table
    assert main(["compare", "--markdown", str(a), str(b)]) == 0
    assert capsys.readouterr().out.startswith("| metric | a@5 | a@20 | b |")
    assert main(["compare", str(tmp_path / "missing.json")]) == 1


def test_jsonl_workload(fake_server, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "Hello there", "output_len": 3}\n{"prompt": "Another one"}\n')
    out = tmp_path / "r.json"
    rc = main(
        [
            "--base-url",
            fake_server.url,
            "--dataset-name",
            "jsonl",
            "--dataset-path",
            str(data),
            "--jsonl-output-len",
            "5",
            "--output-file",
            str(out),
            "--disable-tqdm",
            "--no-plots",
            "--warmup-requests",
            "0",
        ]
    )
    assert rc == 0
    reqs = json.loads(out.read_text())["runs"][0]["requests"]
    assert sorted(r["output_len"] for r in reqs) == [3, 5]


def test_unreachable_exits_nonzero(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(_args(url, tmp_path)) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_all_failed_exits_nonzero(tmp_path, capsys):
    from fake_server import FakeServer

    with FakeServer() as srv:
        # every prompt fails -> the warm-up fails -> exit 1
        data = tmp_path / "p.jsonl"
        data.write_text('{"prompt": "FAIL a"}\n{"prompt": "FAIL b"}\n')
        rc = main(
            [
                "--base-url",
                srv.url,
                "--dataset-name",
                "jsonl",
                "--dataset-path",
                str(data),
                "--output-dir",
                str(tmp_path),
                "--disable-tqdm",
            ]
        )
        assert rc == 1
        assert "warm-up requests failed" in capsys.readouterr().err
        rc = main(
            [
                "--base-url",
                srv.url,
                "--dataset-name",
                "jsonl",
                "--dataset-path",
                str(data),
                "--output-dir",
                str(tmp_path),
                "--disable-tqdm",
                "--warmup-requests",
                "0",
            ]
        )
        assert rc == 1  # ran, but nothing completed
        (path,) = tmp_path.glob("*.json")
        assert json.loads(path.read_text())["runs"][0]["metrics"]["failed"] == 2


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--request-rate", "0"], "--request-rate"),
        (["--request-rate", "fast"], "--request-rate"),
        (["--request-rate-range", "5,1,1"], "--request-rate-range"),
        (["--random-range-ratio", "2"], "--random-range-ratio"),
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--num-prompts", "-3"], "--num-prompts"),
        (["--backend", "nope"], "--backend"),
        (["--dataset-name", "jsonl"], "--dataset-path"),
        (["--extra-request-body", "{oops"], "--extra-request-body"),
        (["--base-url", "localhost:30000"], "--base-url"),
    ],
)
def test_bad_flags_name_the_flag(flags, names, capsys):
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    assert names in capsys.readouterr().err


def test_client_imports_no_torch():
    code = (
        "import sys; import pdserve.bench.cli, pdserve.bench.compare, pdserve.bench.report; "
        "bad = [m for m in ('torch', 'pdserve.engine', 'pdserve.model.llama') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pdserve_entry_point_dispatches(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    r = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--disable-tqdm"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "cannot reach" in r.stderr


def test_default_workload_warns_it_is_gpu_sized(capsys):
    from pdserve.bench.cli import warn_if_long
    from pdserve.bench.datasets import BenchRequest

    assert warn_if_long([BenchRequest("p", 1024, 1024)] * 1000)
    err = capsys.readouterr().err
    assert "hours" in err and "--num-prompts 32" in err
    assert not warn_if_long([BenchRequest("p", 256, 64)] * 32)
