"""The DAG engine: configs, the stage interface and registry, the runner, resources, ids,
provenance, and the streaming data plane stages run on."""
