"""The table registry is the one contract: docs/tables.md is generated from it, stages take their tables from it,
jobs define no schemas of their own, column names mean one thing everywhere, and the report reads registry columns."""
import re
from pathlib import Path

import pytest

from tokens2policy.lakehouse import schemas
from tokens2policy.lakehouse.schemas import TABLES, parse_doc_tables, parse_type, render_doc, table_spec
from tokens2policy.stages import EXTRA_STAGES, STAGES

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "tables.md"


def test_docs_tables_md_is_generated_from_the_registry():
    text = DOC.read_text(encoding="utf-8")
    assert render_doc(text) == text, "docs/tables.md is stale: python -m tokens2policy.lakehouse.schemas --write " \
                                     "docs/tables.md"
    documented = parse_doc_tables(text)
    assert set(documented) == set(TABLES)
    for name, spec in TABLES.items():
        want = [(c.name.strip("<>"), c.type) for c in spec.columns]
        assert documented[name] == want, name


def test_docs_check_catches_a_drifted_column():
    """The check above can fail: a page listing another type, or missing a column, differs from the render."""
    text = DOC.read_text(encoding="utf-8")
    drifted = text.replace("| p_value | double | p-value of the feature given the rest", "| p_value | float | x", 1)
    assert drifted != text and render_doc(drifted) != drifted
    assert parse_doc_tables(drifted)["modifiers"] != [(c.name, c.type) for c in TABLES["modifiers"].columns]


def test_every_registry_type_parses_and_prints_back():
    for spec in TABLES.values():
        for c in spec.columns:
            assert parse_type(c.type).simpleString() == c.type, (spec.name, c.name)
        assert set(spec.keys) <= set(spec.column_names) | {"unit_id", "experiment_id"}, spec.name
        assert set(spec.partition_by) <= set(spec.column_names), spec.name


def test_stages_read_and_write_registered_tables_and_own_what_they_write():
    stages = STAGES + EXTRA_STAGES
    for stage in stages:
        for table in stage.inputs + stage.outputs:
            table_spec(table)  # raises for an unregistered table
        for table in stage.outputs:
            assert TABLES[table].stage == stage.name, (stage.name, table)
        assert set(stage.required_inputs) <= set(stage.inputs)
    written = {t for s in stages for t in s.outputs}
    for name, spec in TABLES.items():
        if spec.stage in {s.name for s in stages}:
            assert name in written, f"{name} is registered to {spec.stage}, which does not declare it as output"
    # a stage only reads what an earlier stage writes (stages talk through tables, in pipeline order)
    order = {s.name: i for i, s in enumerate(STAGES)}
    for s in STAGES:
        for t in s.inputs:
            assert order[TABLES[t].stage] < order[s.name], (s.name, t)


def test_a_column_name_has_one_type_across_tables():
    seen = {}
    for spec in TABLES.values():
        for c in spec.columns:
            if c.repeat:
                continue
            seen.setdefault(c.name, set()).add(c.type)
    assert {n: t for n, t in seen.items() if len(t) > 1} == {}
    # the aliases the report used to guess between are not column names anywhere
    assert not {"p", "pvalue", "pval", "t_stat", "tstat", "reason_code"} & set(seen)


def test_job_modules_define_no_schemas():
    """Table schemas come from the registry: no schema constant or schema-building function in a stage's job module
    (intermediate frames, e.g. a mapInPandas result, still declare their own)."""
    for stage in STAGES + EXTRA_STAGES:
        src = (ROOT / "lib" / "tokens2policy" / stage.name / "job.py").read_text(encoding="utf-8")
        assert not re.search(r"^[A-Z_]*SCHEMA\s*=", src, re.M), stage.name
        for table in stage.outputs:  # no function or DDL string spelling out an output's columns
            assert not re.search(rf"^def _?{table}_schema\(", src, re.M), (stage.name, table)
            ddl = ", ".join(f"{c.name} {c.type}" for c in TABLES[table].columns[1:4])
            assert len(TABLES[table].columns) < 4 or ddl not in src, (stage.name, table)


def test_report_reads_registry_columns():
    from tokens2policy.report.load import EXPECTED_COLUMNS, REPORT_TABLES
    from tokens2policy.stages import get_stage

    assert tuple(REPORT_TABLES) == get_stage("report").inputs
    for table, cols in EXPECTED_COLUMNS.items():
        assert table in REPORT_TABLES
        assert set(cols) <= set(TABLES[table].column_names), table


def test_validation_runs_registry_matches_the_study_rows():
    from tokens2policy.validate.study import RESULT_COLUMNS

    kinds = {"int64": "bigint", "float64": "double", "object": "string", "bool": "boolean"}
    want = [("run_id", "string"), ("study", "string")] + [(c, kinds[t]) for c, t in RESULT_COLUMNS.items()]
    assert sorted(want) == sorted((c.name, c.type) for c in TABLES["validation_runs"].columns)


def test_frame_schema_check_names_what_is_wrong():
    from pyspark.sql import types as T

    spec = table_spec("neuron_stats")
    schemas.check_frame_schema("neuron_stats", spec.schema())  # exact: fine
    wrong = T.StructType([f if f.name != "n_active" else T.StructField("n_active", T.IntegerType())
                          for f in spec.schema().fields if f.name != "mean_activation"]
                         + [T.StructField("extra", T.StringType())])
    with pytest.raises(schemas.SchemaContractError) as info:
        schemas.check_frame_schema("neuron_stats", wrong)
    msg = str(info.value)
    assert "missing ['mean_activation']" in msg and "unregistered ['extra']" in msg and "n_active is int" in msg
    units = table_spec("units").schema({"source.outcome_cols": ["y1", "y2"], "source.covariate_cols": ["age"]},
                                       key_types={"unit_id": "bigint"})
    assert [f.name for f in units.fields] == ["experiment_id", "unit_id", "treatment", "y1", "y2", "text", "age",
                                              "cluster", "fold"]
    assert units["unit_id"].dataType == T.LongType()


def test_config_sections_a_stage_package_reads_are_declared():
    """A static cross-check of the runtime one (the config view raises on an undeclared section): every
    ``cfg.<section>`` / ``config.<section>`` in a stage's package is a declared section (or a section with a
    declared key), or one that only says where things are."""
    from tokens2policy.config import Config
    from tokens2policy.context import INFRASTRUCTURE

    fields = {name: (field.alias or name) for name, field in Config.model_fields.items()}
    for stage in STAGES + EXTRA_STAGES:
        declared = {d.partition(".")[0] for d in stage.readable}
        read = set()
        for path in (ROOT / "lib" / "tokens2policy" / stage.name).glob("*.py"):
            if path.name in ("notebook.py", "summary.py"):  # report helpers run outside the stage (CLI, notebooks)
                continue
            read |= set(re.findall(r"\b(?:cfg|config)\.([a-z_]+)\b", path.read_text(encoding="utf-8")))
        sections = {fields[r] for r in read if r in fields} - INFRASTRUCTURE
        assert sections <= declared, (stage.name, sorted(sections - declared))
