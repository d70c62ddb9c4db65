"""Training methods. Each file = how a batch is made + a pure loss function + metrics; all share
`train.loop.train`, the sampler and the log-prob helper."""
