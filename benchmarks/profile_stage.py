"""Run one ``t2p`` command in this process and report its Spark jobs and CPU seconds (issue 16: stage fixed costs).

    PYTHONPATH=lib OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_stage.py out.json \\
        run ingest --config conf/local.yaml --set data_dir=/tmp/fresh_dir

After the command ends (the Spark session is still up), the session's Spark UI REST API gives the list of jobs
(``/api/v1/applications/<id>/jobs``) and stages (``/stages``, with executor run and CPU time); the CPU seconds of
the whole process tree (this Python, the JVM, the Python workers) come from ``/proc``. All go to ``out.json``; one
summary line is printed. On a shared machine wall seconds follow the CPU share the process gets, so job counts and
CPU seconds are what compare across loads.
"""
import json
import os
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))


def _cpu_seconds(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _children(pid: int):
    try:
        return [int(x) for x in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, command = argv[0], argv[1:]
    from tokens2policy import cli

    started = time.time()
    try:
        rc = cli.main(command)
    except SystemExit as exc:
        rc = exc.code
    res = {"command": command, "rc": rc, "wall": time.time() - started}
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    if sc is not None and sc.uiWebUrl:
        url, app = sc.uiWebUrl.rstrip("/"), sc.applicationId
        jobs = json.load(urllib.request.urlopen(f"{url}/api/v1/applications/{app}/jobs"))
        stages = json.load(urllib.request.urlopen(f"{url}/api/v1/applications/{app}/stages"))
        res["jobs"] = [{k: j.get(k) for k in ("jobId", "name", "description", "submissionTime", "completionTime",
                                              "status", "numTasks", "stageIds")} for j in jobs]
        res["stages"] = [{k: s.get(k) for k in ("stageId", "attemptId", "name", "numTasks", "executorRunTime",
                                                "executorCpuTime", "inputBytes", "shuffleReadBytes",
                                                "shuffleWriteBytes", "submissionTime", "completionTime",
                                                "jvmGcTime")} for s in stages]
        res["executor_cpu_seconds"] = sum(s.get("executorCpuTime") or 0 for s in stages) / 1e9
    total, stack = 0.0, [os.getpid()]
    while stack:
        pid = stack.pop()
        total += _cpu_seconds(pid)
        stack += _children(pid)
    res["process_tree_cpu_seconds"] = total
    res["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"[profile] rc {rc} wall {res['wall']:.1f}s spark jobs {len(res.get('jobs', []))} "
          f"executor cpu {res.get('executor_cpu_seconds', 0):.1f}s process-tree cpu {total:.1f}s "
          f"load {res['loadavg']}", flush=True)
    return res


if __name__ == "__main__":
    main()
