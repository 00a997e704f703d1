"""The workloads every engine is measured on, as `pdserve bench` flags.

Each has a full form and a `--smoke` form (a few requests, to check the plumbing
without spending minutes of a shared machine).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    bench_args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    offline: bool = True  # can the transformers floor (static batches) run it?

    def args(self, smoke: bool, slo_ttft_ms: float, slo_tpot_ms: float, rates: str) -> list[str]:
        out = list(self.smoke_args if smoke else self.bench_args)
        out = [rates if a == "{rates}" else a for a in out]
        return out + ["--slo-ttft-ms", f"{slo_ttft_ms:g}", "--slo-tpot-ms", f"{slo_tpot_ms:g}"]


_RANDOM = ("--dataset-name", "random", "--random-range-ratio", "1")

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "single",
            "single stream: 128 input / 128 output tokens, one request at a time",
            (
                *_RANDOM,
                "--random-input-len",
                "128",
                "--random-output-len",
                "128",
                "--num-prompts",
                "4",
                "--max-concurrency",
                "1",
                "--request-rate",
                "inf",
            ),
            (
                *_RANDOM,
                "--random-input-len",
                "32",
                "--random-output-len",
                "16",
                "--num-prompts",
                "2",
                "--max-concurrency",
                "1",
                "--request-rate",
                "inf",
            ),
        ),
        Workload(
            "batch64",
            "64 requests of 256 input / 128 output tokens, all at once",
            (
                *_RANDOM,
                "--random-input-len",
                "256",
                "--random-output-len",
                "128",
                "--num-prompts",
                "64",
                "--request-rate",
                "inf",
            ),
            (
                *_RANDOM,
                "--random-input-len",
                "64",
                "--random-output-len",
                "16",
                "--num-prompts",
                "4",
                "--request-rate",
                "inf",
            ),
        ),
        Workload(
            "mixed-sweep",
            "mixed: 128/64-token requests with 1 in 8 of 1024 input tokens, Poisson arrivals, rate sweep",
            (
                "--dataset-name",
                "mixed",
                "--random-range-ratio",
                "1",
                "--random-input-len",
                "128",
                "--random-output-len",
                "64",
                "--mixed-long-input-len",
                "1024",
                "--mixed-long-fraction",
                "0.125",
                "--num-prompts",
                "32",
                "--request-rate",
                "{rates}",
            ),
            (
                "--dataset-name",
                "mixed",
                "--random-range-ratio",
                "1",
                "--random-input-len",
                "32",
                "--random-output-len",
                "8",
                "--mixed-long-input-len",
                "256",
                "--mixed-long-fraction",
                "0.25",
                "--num-prompts",
                "4",
                "--request-rate",
                "{rates}",
            ),
            offline=False,
        ),
    )
}
