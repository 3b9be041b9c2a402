import numpy as np
import pytest

from hf_iterheads import (
    IterativeTask,
    IterHeadsError,
    get_task,
    make_cumsum_task,
    register_task,
)
from hf_iterheads.tasks import _REGISTRY, S3_ELEMENTS, S3_TABLE, task_names


def chain(name, inputs):
    return get_task(name).run(np.asarray([inputs]))[0].tolist()


def test_paper_tasks_on_hand_worked_examples():
    assert chain("binary_copy", [1, 0, 0, 1]) == [1, 0, 0, 1]
    assert chain("parity", [1, 1, 0, 1, 0]) == [1, 0, 0, 1, 1]
    # s1 = x1 = 3; 3*4+1 = 13 = 2; 2*10+1 = 21 = 10; 10*1+1 = 11 = 0 (mod 11)
    assert chain("polynomial", [3, 4, 10, 1]) == [3, 2, 10, 0]


def test_new_tasks_on_hand_worked_examples():
    assert chain("cumsum", [7, 5, 10, 0]) == [7, 1, 0, 0]
    assert chain("cumsum_mod5", [4, 4, 4]) == [4, 3, 2]
    # S3: (0,2,1) is a transposition, (1,2,0) a 3-cycle; composing a transposition with itself is the identity
    swap, cycle = S3_ELEMENTS.index((0, 2, 1)), S3_ELEMENTS.index((1, 2, 0))
    assert chain("s3_product", [swap, swap]) == [swap, 0]
    # s_2 = s_1 o x_2: apply x_2 first, then s_1
    assert chain("s3_product", [cycle, swap])[1] == S3_ELEMENTS.index(tuple(S3_ELEMENTS[cycle][S3_ELEMENTS[swap][i]] for i in range(3)))
    assert not np.array_equal(S3_TABLE, S3_TABLE.T), "S3 must be non-commutative"


def test_alphabets_and_sampling():
    poly = get_task("polynomial")
    assert poly.inputs == tuple(range(1, 11)) and poly.states == tuple(range(11))
    x = poly.sample_inputs(4000, 16, np.random.default_rng(0))
    assert x.shape == (4000, 16) and x.min() == 1 and x.max() == 10  # 0 never drawn
    assert set(np.unique(get_task("parity").sample_inputs(100, 16, np.random.default_rng(0)))) == {0, 1}


def test_sampling_is_seeded():
    task = get_task("s3_product")
    a = task.sample_inputs(8, 5, np.random.default_rng(7))
    b = task.sample_inputs(8, 5, np.random.default_rng(7))
    c = task.sample_inputs(8, 5, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_vectorised_run_matches_a_python_loop():
    task = get_task("polynomial")
    x = task.sample_inputs(50, 9, np.random.default_rng(1))
    expected = []
    for row in x.tolist():
        s = [row[0]]
        for v in row[1:]:
            s.append((s[-1] * v + 1) % 11)
        expected.append(s)
    assert task.run(x).tolist() == expected


def test_register_custom_task():
    task = IterativeTask("test_affine7", inputs=range(7), states=range(7), step=lambda s, x: (2 * s + x) % 7)
    try:
        register_task(task)
        assert "test_affine7" in task_names()
        assert chain("test_affine7", [3, 1, 6]) == [3, 0, 6]
        assert register_task(task) is task  # the same task again: nothing changes
        twin = IterativeTask("test_affine7", inputs=range(7), states=range(7), step=lambda s, x: (3 * s + x) % 7)
        with pytest.raises(IterHeadsError, match="already registered"):
            register_task(twin)
    finally:
        _REGISTRY.pop("test_affine7", None)


def test_custom_step_leaving_its_alphabet_is_refused():
    with pytest.raises(IterHeadsError, match=r"returned 5 on \(0, 0\), which is not one of its states"):
        IterativeTask("test_bad", inputs=(0, 1), states=(0, 1), step=lambda s, x: s + x + 5)
    assert "test_bad" not in task_names()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: get_task("fibonacci"), "unknown task"),
        (lambda: make_cumsum_task(1), "modulus must be between 2 and 4096"),
        (lambda: get_task("cumsum_mod1"), "modulus must be between 2 and 4096"),
        (lambda: get_task("parity").sample_inputs(3, 0, np.random.default_rng(0)), "at least 1"),
        (lambda: IterativeTask("bad name!", (0,), (0,), step=lambda s, x: s), "letters, digits"),
    ],
)
def test_bad_input_is_one_clear_error(make, message):
    with pytest.raises(IterHeadsError, match=message):
        make()
