"""Start-up errors of `pdserve serve` / `pdserve launch`: exit status 2, one line that names
the flag and the fix, no traceback, and no model load (each must fail in seconds)."""

import json
import subprocess
import sys
import time

import pytest
import torch

from pdserve.net import free_port


def run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", *argv], capture_output=True, text=True, timeout=timeout)
    r.elapsed = time.time() - t0
    return r


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def port():
    return str(free_port())


def test_bare_pdserve_prints_usage_and_exits_2():
    r = run()
    assert r.returncode == 2 and "usage: pdserve <command>" in r.stderr


@pytest.mark.parametrize("cmd", ["serve", "launch", "router", "bench"])
def test_help_shows_defaults(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "(default:" in r.stdout, r.stdout


def test_tp_size_over_kv_heads(port):
    r = run("serve", "--port", port, "--tp-size", "4")
    one_line_error(r, "--tp-size 4", "3 KV heads", "1 to 3")
    assert r.elapsed < 20


@pytest.mark.parametrize("mode", ["null", "prefill", "decode"])
def test_unknown_transfer_backend(port, mode):
    one_line_error(
        run("serve", "--port", port, "--disaggregation-mode", mode, "--disaggregation-transfer-backend", "foo"),
        "--disaggregation-transfer-backend",
        "tcp",
    )


def test_hub_name_says_local_paths(port):
    one_line_error(
        run("serve", "--port", port, "--model-path", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        "--model-path",
        "huggingface-cli download",
        "--local-dir",
        ".gguf",
    )


def test_empty_model_dir(port, tmp_path):
    err = one_line_error(run("serve", "--port", port, "--model-path", str(tmp_path)), "--model-path", "config.json")
    assert "sentencepiece" not in err and "tiktoken" not in err


def test_unsupported_model_type(port, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_attention_heads": 12}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    one_line_error(run("serve", "--port", port, "--model-path", str(tmp_path)), "model_type 'gpt2'", "llama")


def test_device_and_chat_template_and_trust_remote_code(port):
    one_line_error(run("serve", "--port", port, "--device", "cuda"), "--device", "cpu")
    one_line_error(run("serve", "--port", port, "--chat-template", "no-such-file"), "--chat-template")
    r = run("serve", "--help")
    assert "--trust-remote-code" in r.stdout and "--chat-template" in r.stdout


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--dtype", "fp8"], "--dtype"),
        (["--policy", "foo"], "--policy"),
        (["--disaggregation-transfer-backend", "foo"], "--disaggregation-transfer-backend"),
        (["--transfer-backend", "foo"], "--disaggregation-transfer-backend"),
        (["--decode-tp-size", "4"], "--decode-tp-size 4"),
        (["--server-args", "--no-such-flag"], "--no-such-flag"),
        (["--model-path", "HuggingFaceTB/SmolLM2-135M-Instruct"], "huggingface-cli download"),
        (["--pd-ratio", "2-3"], "--pd-ratio"),
        (["--pd-ratio", "0:1"], "--prefill must be >= 1"),
    ],
)
def test_launch_validates_its_flags(argv, needle):
    r = run("launch", "--port", str(free_port()), *argv)
    err = one_line_error(r, needle)
    assert err.startswith("pdserve launch: error:"), err
    assert "usage: pdserve serve" not in r.stderr


def test_launch_policy_default_is_the_routers():
    from pdserve.launch.cli import build_parser
    from pdserve.router.config import RouterConfig

    assert build_parser().parse_args([]).policy == RouterConfig.policy


def test_launch_pd_ratio_spells_prefill_and_decode():
    from pdserve.launch.cli import build_parser, check_flags

    ns = build_parser().parse_args(["--pd-ratio", "2:3", "--port", str(free_port())])
    check_flags(ns)
    assert (ns.prefill, ns.decode) == (2, 3)


def test_launch_server_args_accepts_leading_dashes():
    from pdserve.launch.cli import build_parser, normalize_argv

    ns = build_parser().parse_args(normalize_argv(["--server-args", "--max-running-requests 8"]))
    assert ns.server_args == "--max-running-requests 8"
    ns = build_parser().parse_args(normalize_argv(["--transfer-backend", "shm"]))
    assert ns.disaggregation_transfer_backend == "shm"


def test_every_flag_has_a_help_line():
    from pdserve.bench.cli import build_parser as bench
    from pdserve.launch.cli import build_parser as launch
    from pdserve.router.cli import build_parser as router
    from pdserve.server.serve_cli import build_parser as serve

    for build in (serve, launch, router, bench):
        p = build()
        assert not [a.option_strings for a in p._actions if not a.help], p.prog


def test_router_errors_are_one_line():
    one_line_error(run("router", "--policy", "foo"), "--policy")


def test_failure_in_the_scheduler_is_one_line_too(port):
    # found only once the weights load: still exit 2, one line, no traceback
    one_line_error(
        run("serve", "--port", port, "--mem-fraction-static", "0.0001", timeout=120), "--mem-fraction-static"
    )


def test_launch_port_taken():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        one_line_error(run("launch", "--port", str(taken - 1)), "--port", "is taken")


def test_unknown_tool_call_parser(port):
    one_line_error(run("serve", "--port", port, "--tool-call-parser", "foo"), "--tool-call-parser", "hermes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl is valid where CUDA is")
@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nccl"],
        ["serve", "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "nccl"],
        ["launch", "--transfer-backend", "nccl"],
    ],
)
def test_nccl_without_gpu(port, argv):
    """nccl on a machine without a GPU: a start-up error naming the flag, before any model load."""
    r = run(argv[0], "--port", port, *argv[1:])
    one_line_error(r, "nccl backend needs CUDA GPUs", "gloo")
    assert "--disaggregation-transfer-backend" in r.stderr or "--transfer-backend" in r.stderr, r.stderr
    assert r.elapsed < 20


def test_launch_child_failing_after_load_exits_2():
    """A flag only a server can judge once the weights are loaded: the server's one line,
    then launch's, status 2 and no traceback."""
    r = run("launch", "--port", str(free_port()), "--server-args=--mem-fraction-static 0.0001", timeout=180)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "--mem-fraction-static" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "pdserve launch:" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--kv-store", "mooncake"], ["--kv-store", "backend name", "mooncake://MASTER_HOST:PORT"]),
        (["--hicache-storage-backend", "redis://h:1"], ["--kv-store", "unknown scheme 'redis'", "http://"]),
        (["--kv-store", "http://127.0.0.1"], ["--kv-store", "host and a port"]),
        (["--kv-store", "memory://lots"], ["--kv-store", "byte count"]),
        (["--kv-store-timeout", "0"], ["--kv-store-timeout", "(0, 60]"]),
    ],
)
def test_bad_kv_store(port, flags, needles):
    one_line_error(run("serve", "--port", port, *flags), *needles)
