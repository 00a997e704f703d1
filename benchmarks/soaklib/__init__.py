"""The parts of the soak with faults (benchmarks/soak.py, issue #10) and of the prefill RSS
probe (benchmarks/rss_probe.py):

- procs.py: the deployment (1P1D behind the router), each process restartable on its ports,
  and RSS per process;
- clients.py: the request mix, one classified request, the closed-loop capacity run, the probe;
- faults.py: the fault schedule and the recovery time after each fault;
- report.py: KV pools at the end, the RSS summary, the Markdown table and the RSS plot.
"""
