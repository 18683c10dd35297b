"""Errors for people: `t2p run` prints one line saying what to do (no traceback) and exits with status 2.

The CLI runs in-process on the test session's Spark (``spark.session=auto`` reuses the active session).
"""
import pytest

from tokens2policy.cli import main
from tokens2policy.lakehouse import read_table, table_exists, write_table
from tokens2policy.stages import Stage, _cuda_probe, require_gpu, run_stages

UNITS_SCHEMA = "experiment_id string, unit_id string, text string, treatment int, engagement double"


def _t2p(capsys, data_dir, *args):
    rc = main(["run", *args, "--set", f"data_dir={data_dir}"])
    out = capsys.readouterr()
    return rc, out.err.strip().splitlines()


def _units(spark, cfg, rows):
    write_table(spark.createDataFrame(rows, UNITS_SCHEMA), cfg, "units")


def _one_line(rc, err):
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("t2p: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_missing_input_table_names_the_stage_to_run_first(spark, cfg, capsys):
    line = _one_line(*_t2p(capsys, cfg.data_dir, "identify"))
    assert line.startswith("t2p: error: identify needs table 'units', which does not exist yet")
    assert line.endswith("run `t2p run ingest` first (the ingest stage writes it), or `t2p run all`")

    _units(spark, cfg, [("e1", "u1", "a text", 1, 0.5)])  # units now exist: identify before represent
    line = _one_line(*_t2p(capsys, cfg.data_dir, "identify"))
    assert "identify needs table 'neurons', which does not exist yet" in line
    assert line.endswith("run `t2p run represent` first (the represent stage writes it), or `t2p run all`")
    assert not table_exists(spark, cfg, "stage_runs"), "nothing ran, so nothing is recorded"


def test_missing_table_read_inside_a_stage_names_its_writer(spark, make_cfg):
    cfg = make_cfg()

    def reads_gates(ctx):
        read_table(ctx.spark, ctx.config, "gates")

    # gates is an input it may run without (requires=()), so the read inside the job is what finds it missing
    lonely = Stage("lonely", ("gates",), ("t_lonely",), ("report",), requires=(), tracked=False)
    from tokens2policy.lakehouse import MissingTableError

    with pytest.raises(MissingTableError) as info:
        run_stages(spark, cfg, ["lonely"], stages=(lonely,), resolve=lambda name: reads_gates, echo=lambda m: None)
    assert str(info.value) == ("lonely needs table 'gates', which does not exist yet: run `t2p run effects` first "
                               "(the effects stage writes it), or `t2p run all`")
    runs = read_table(spark, cfg, "stage_runs").collect()
    assert [(r.stage, r.status) for r in runs] == [("lonely", "failed")]


def test_bad_config_value_is_one_line(cfg, capsys):
    line = _one_line(*_t2p(capsys, cfg.data_dir, "identify", "--set", "identify.alpha=abc"))
    assert line == ("t2p: error: config key 'identify.alpha': Input should be a valid number, unable to parse string "
                    "as a number (got 'abc')")
    line = _one_line(*_t2p(capsys, cfg.data_dir, "embed", "--set", "embed.device=gpu"))
    assert line == "t2p: error: config key 'embed.device': Input should be 'auto', 'cpu' or 'cuda' (got 'gpu')"


def test_gpu_required_but_absent_is_one_line(spark, cfg, capsys):
    host, n_gpus = _cuda_probe()
    if n_gpus:  # a GPU machine: the requirement is met and says where
        assert require_gpu(spark, "embed.device=cuda", "x") == {host: n_gpus}
        return
    _units(spark, cfg, [("e1", "u1", "a text", 1, 0.5)])
    line = _one_line(*_t2p(capsys, cfg.data_dir, "embed", "--set", "embed.device=cuda"))
    assert line == (f"t2p: error: embed.device=cuda needs a CUDA GPU but none is visible on this machine ({host}: "
                    "torch.cuda.is_available() is False): run on a GPU machine or cluster with a CUDA build of torch, "
                    "or --set embed.device=auto (the GPU when there is one, else the CPU)")
    assert not table_exists(spark, cfg, "embeddings"), "failed before any work"


def test_empty_units_and_unknown_experiment_id_are_one_line(spark, cfg, capsys):
    _units(spark, cfg, [])
    line = _one_line(*_t2p(capsys, cfg.data_dir, "embed"))
    assert line.startswith("t2p: error: table 'units' has no rows: ingest accepted no unit from the source")
    assert line.endswith("then `t2p run ingest`")

    emb = spark.createDataFrame([("exp_a", "u1", [0.1, 0.2]), ("exp_b", "u2", [0.3, 0.4])],
                                "experiment_id string, unit_id string, vector array<float>")
    write_table(emb, cfg, "embeddings", partition_by=["experiment_id"])
    write_table(emb.limit(0), cfg, "token_states")
    line = _one_line(*_t2p(capsys, cfg.data_dir, "represent", "--set", "represent.experiment_id=exp_c"))
    assert line == ("t2p: error: represent.experiment_id='exp_c' has no units in table 'embeddings' (experiments "
                    "there: exp_a, exp_b): fix the id, or --set represent.experiment_id=null for every experiment")
