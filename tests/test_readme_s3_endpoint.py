"""README: "S3 endpoints and credentials come from the standard AWS environment or config files
and are never written to manifests, logs or dataset metadata." A run on a (moto) S3 root,
then every object it wrote (run and stage manifests, dataset manifests, Parquet shards and
their metadata, logs, pointers) and the CLI's output are searched for the endpoint."""
import os

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.store.storage import Storage


@pytest.mark.s3
def test_the_s3_endpoint_is_written_nowhere(ray_local, moto_s3_bucket, tmp_path):
    endpoint = os.environ["AWS_ENDPOINT_URL"]  # http://127.0.0.1:<port>, the moto server's
    host = endpoint.split("://", 1)[1]
    root = f"s3://{moto_s3_bucket}/endpoint-{tmp_path.name}"
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"Compute {i} + 1.", "answer": str(i + 1)} for i in range(8)]
                      + [{"prompt": "no answer"}])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: endpoint
storage: {{root: {root}}}
stages:
  prompts: {{params: {{path: {src}}}}}
  toy_task: {{params: {{seed: 0, train_size: 20, distill_size: 4, eval_size: 4}}}}
  both: {{uses: concat, inputs: {{a: prompts.prompts, b: toy_task.distill}}}}
""")
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(app, ["datasets", "ls", root, "--long"])
    assert shown.exit_code == 0 and "both.data" in shown.output, shown.output

    st = Storage(root)
    st.fs.invalidate_cache()
    objects = st.fs.find(st.path(""))
    kinds = {p.rsplit(".", 1)[-1] for p in objects}
    assert {"json", "parquet"} <= kinds and len(objects) >= 10, objects  # the run wrote what the check reads
    for path in objects:
        body = st.fs.cat(path)
        assert endpoint.encode() not in body and host.encode() not in body, f"the endpoint is written in {path}"
    for text in (result.output, shown.output):
        assert host not in text
