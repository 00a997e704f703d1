"""Semi-PD flags of `pdserve serve`: validated before anything starts (one line naming the
flag, exit 2, no model load); settings the server cannot honour are refused, not ignored."""

import pytest

from tests.cli.test_cli_errors import one_line_error, run


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--initial-prefill-sm", "80", "--initial-decode-sm", "30"], ["--initial-prefill-sm", "110 %", "over 100 %"]),
        (
            ["--enable-semi-pd", "--unified-memory-block-size", "100"],
            ["--unified-memory-block-size", "multiple of 128"],
        ),
        (["--enable-semi-pd", "--unified-memory-blocks", "2000"], ["--unified-memory-blocks", "not yet supported"]),
        (["--slo-ttft-target", "80"], ["--slo-ttft-target", "needs --enable-semi-pd"]),
        (["--semi-pd-switch", "rotation"], ["--semi-pd-switch", "needs --enable-semi-pd"]),
        (["--enable-semi-pd", "--semi-pd-switch", "mps"], ["--semi-pd-switch", "invalid choice"]),
        (["--enable-semi-pd", "--slo-tpot-target", "40"], ["--slo-tpot-target", "--enable-slo-aware"]),
        (["--enable-semi-pd", "--slo-ttft-target", "-1"], ["--slo-ttft-target", "positive"]),
        (["--enable-semi-pd", "--kv-store", "memory://lots"], ["--kv-store", "byte count"]),  # checked as in mode null
        (
            ["--enable-semi-pd", "--disaggregation-mode", "prefill"],
            ["--enable-semi-pd", "--disaggregation-mode prefill"],
        ),
    ],
)
def test_bad_semi_pd_flags(argv, needles):
    r = run("serve", "--port", "39999", *argv)
    one_line_error(r, *needles)
    assert r.elapsed < 20
