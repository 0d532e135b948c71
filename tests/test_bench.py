"""The benchmark script's own arithmetic (the benchmark itself is not a test: `make bench`)."""
import bench


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """Each round times one step of (a) and one of (b), alternating which goes first; the ratio
    is the median of t_b / t_a over rounds, so one slow round (a load spike) does not move it."""
    clock, calls = [0.0], []

    def step(name, secs):
        def fn():
            calls.append(name)
            clock[0] += secs() if callable(secs) else secs
        return fn
    spike = iter([0.0, 0.0] + [10.0] + [0.0] * 10)             # after 2 warm-up calls of (b)
    q50, q25, q75 = bench.paired_ratio(step("a", 1.0), step("b", lambda: 2.0 + next(spike)),
                                       warmup=2, rounds=5, clock=lambda: clock[0])
    assert q50 == 2.0 and q25 == 2.0 and q75 == 2.0
    assert calls[:4] == ["a", "b", "a", "b"]                        # warm-up
    assert calls[4:] == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
