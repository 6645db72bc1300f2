"""The paper's evaluation: the DreamBench protocol, the metrics and the evaluation of a run."""
