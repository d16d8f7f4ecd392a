from pipeline.config import load_config
from pipeline.train.cadence import Cadence


def steps(cadence: Cadence, question: str) -> list[int]:
    return [s for s in range(1, cadence.total_steps + 1) if getattr(cadence, question)(s)]


def test_every_n_steps_and_at_the_end():
    cadence = Cadence(total_steps=25, log_every=10, checkpoint_every=8, eval_every=12)
    assert steps(cadence, "should_log") == [10, 20, 25]
    assert steps(cadence, "should_checkpoint") == [8, 16, 24, 25]
    assert steps(cadence, "should_validate") == [12, 24, 25]
    assert steps(cadence, "should_end") == [25] and not cadence.should_end(0)


def test_no_validation_and_a_stop_at_a_step():
    cadence = Cadence(total_steps=25, log_every=10, checkpoint_every=100, eval_every=None, stop_at_step=7)
    assert steps(cadence, "should_validate") == []
    assert steps(cadence, "should_checkpoint") == [7, 25]  # the stop is saved, to be resumed
    assert steps(cadence, "should_end")[0] == 7


def test_from_the_config():
    config = load_config("demo/pretrain.yaml", ["train.stop_at_step=300"])
    cadence = Cadence.of(config.train, 1000)
    assert steps(cadence, "should_checkpoint") == [200, 300, 400, 600, 800, 1000]
    assert steps(cadence, "should_validate") == list(range(100, 1001, 100))
