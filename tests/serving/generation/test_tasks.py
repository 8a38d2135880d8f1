"""The task layer with fakes at its two seams (the worker pool and the mixer's playlist).

In the spirit of pipecat's ``run_test``: feed tasks in, drive the fake pool's jobs by hand, assert
what comes out and in which order. No processes, no clock assertions: every wait is for a condition
with a generous timeout.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from latentsync.engines import CHUNK_FRAMES
from latentsync.serving.generation import scheduler as tasks_module
from latentsync.serving.generation.processor import TaskProcessor
from latentsync.serving.generation.program import SpeechProgram
from latentsync.serving.generation.task import ALLOWED_MOVES, FINAL_STATES, Task, TaskState
from latentsync.serving.playout.mixer import ProgramEvent
from tests.fakes import FPS, FakeAvatar, FakePool, fake_manager, speech, wait_for


@pytest.fixture
def setup():
    pool = FakePool()
    manager, playlist = fake_manager(pool, FakeAvatar())
    yield manager, pool, playlist
    manager.close()


def test_only_the_task_on_air_and_the_next_generate_and_cancel_frees_at_once(setup):
    manager, pool, playlist = setup
    a, _ = manager.submit(speech(2.0), None, None)
    b, position_b = manager.submit(speech(2.0), None, None)
    c, position_c = manager.submit(speech(2.0), None, None)
    assert (position_b, position_c) == (1, 2)
    wait_for(lambda: pool.of(a.task_id) and pool.of(b.task_id), "features jobs of a and b")
    time.sleep(0.3)  # c's processor had time to submit, were it admitted (it must not be)
    assert pool.of(c.task_id) == [] and c.state is TaskState.queued and c.audio is not None
    assert manager.admitted() == 2 and manager.waiting() == 3
    # b's first frame is due when a (2 s = 50 frames) would end: its job ranks after a's.
    job_a, job_b = pool.of(a.task_id)[0], pool.of(b.task_id)[0]
    assert job_b.due_at - job_a.due_at == pytest.approx(a.num_frames / FPS, abs=0.2)

    # Cancelling a frees everything it held and admits c.
    program_a = playlist.programs[0]
    assert manager.cancel(a.task_id) is a
    assert a.state is TaskState.cancelled and a.audio is None and pool.of(a.task_id) == []
    assert a.task_id in pool.cancelled and a.task_id in playlist.interrupted and program_a.is_cancelled()
    assert manager.waiting() == 2
    wait_for(lambda: pool.of(c.task_id), "c admitted once a was cancelled")
    assert c.state in (TaskState.preparing, TaskState.generating)

    # Cancelling twice is harmless; an unknown id is None.
    assert manager.cancel(a.task_id).state is TaskState.cancelled
    assert manager.cancel("nope") is None


def test_features_then_chunks_in_order_into_the_program(setup):
    manager, pool, playlist = setup
    task, _ = manager.submit(speech(1.0), 3, 1.5)  # 25 frames + 0 tail: 2 chunks
    wait_for(lambda: pool.of(task.task_id), "the features job")
    features = pool.of(task.task_id)[0]
    assert features.kind == "features" and features.frames == (0, 2 * CHUNK_FRAMES)
    pool.take(features)
    features.on_done(np.zeros((2 * CHUNK_FRAMES, 2), np.float32))
    wait_for(lambda: len(pool.of(task.task_id)) == 2, "two chunk jobs")
    chunks = pool.of(task.task_id)
    assert [j.request.chunk_index for j in chunks] == [0, 1]
    assert chunks[0].due_at < chunks[1].due_at
    assert chunks[1].request.frame_indices.tolist()[-1] == 24  # the last chunk is padded with the last frame
    assert (chunks[0].request.seed, chunks[0].request.guidance_scale) == (3, 1.5)
    assert task.state is TaskState.generating
    from latentsync.engines import ChunkResult

    program = playlist.programs[0]
    for job in reversed(chunks):  # out of order: the program puts them back in order
        pool.take(job)
        r = job.request
        job.on_done(
            ChunkResult(r.task_id, r.chunk_index, r.frame_indices, np.full((16, 2, 2, 3), r.chunk_index, np.uint8), 0.1)
        )
    assert task.chunks_generated == 2 and program.ready_to_start()
    assert [int(program.frame(i)[0, 0, 0]) for i in (0, 15, 16, 24)] == [0, 0, 1, 1]


def test_a_failed_job_fails_the_task_and_admits_the_next(setup):
    manager, pool, _ = setup
    a, _ = manager.submit(speech(1.0), None, None)
    b, _ = manager.submit(speech(1.0), None, None)
    c, _ = manager.submit(speech(1.0), None, None)
    wait_for(lambda: pool.of(a.task_id), "a's features job")
    job = pool.of(a.task_id)[0]
    pool.take(job)
    job.on_error("features failed: boom")
    wait_for(lambda: a.state is TaskState.failed, "a failed")
    assert a.error == "features failed: boom" and a.audio is None
    wait_for(lambda: pool.of(c.task_id), "c admitted once a failed")
    assert manager.final_counts() == {"done": 0, "failed": 1, "cancelled": 0}


def test_queue_limit_and_trim_of_finished_tasks(setup, monkeypatch):
    manager, _, _ = setup
    monkeypatch.setattr(tasks_module, "MAX_FINISHED_TASKS", 2)
    accepted = [manager.submit(speech(0.5), None, None)[0] for _ in range(4)]
    assert manager.submit(speech(0.5), None, None) is None  # max_queued=4 wait already
    for task in accepted:
        manager.cancel(task.task_id)
    assert manager.waiting() == 0
    fifth, _ = manager.submit(speech(0.5), None, None)  # trims the oldest finished tasks
    listed = [t.task_id for t in manager.list()]
    assert listed == [fifth.task_id, accepted[3].task_id, accepted[2].task_id]
    assert manager.final_counts() == {"done": 0, "failed": 0, "cancelled": 4}


def test_lifecycle_races_never_make_an_illegal_move():
    """Cancel, fail and done race from three threads on a task on air; the first final move wins."""
    iterations = 2000
    rng = random.Random(11)
    for i in range(iterations):
        task = Task(task_id=f"t{i}", audio=None, num_frames=10, num_chunks=1)
        ends = []
        task.on_final = lambda t, ends=ends: ends.append(t.state)
        for state in (TaskState.preparing, TaskState.generating, TaskState.streaming):
            assert task.transition(state) is not None
        moves = [TaskState.cancelled, TaskState.failed, TaskState.done]
        rng.shuffle(moves)
        won: list[TaskState] = []
        barrier = threading.Barrier(len(moves))

        def attempt(to: TaskState, won=won, task=task, barrier=barrier) -> None:
            barrier.wait(5.0)
            if task.transition(to, "why" if to is not TaskState.done else None) is not None:
                won.append(to)

        threads = [threading.Thread(target=attempt, args=(m,)) for m in moves]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5.0)
        assert len(won) == 1 and task.state is won[0] and ends == [won[0]], (i, won, task.state)
        assert task.history[-1] is won[0] and len(task.history) == 5
        for before, after in zip(task.history, task.history[1:], strict=False):
            assert after in ALLOWED_MOVES[before]
        assert task.finished_at is not None and (task.error is None) == (won[0] is TaskState.done)


def test_transition_table_refuses_illegal_moves():
    task = Task(task_id="t", audio=None, num_frames=10, num_chunks=1)
    assert task.transition(TaskState.done) is None and task.state is TaskState.queued  # queued -> done: no
    assert task.transition(TaskState.cancelled) is TaskState.queued
    for state in TaskState:
        assert task.transition(state) is None  # final: nothing moves it
    assert task.history == [TaskState.queued, TaskState.cancelled]
    assert all(not ALLOWED_MOVES[s] for s in FINAL_STATES)


@pytest.mark.parametrize(
    ("ready_chunks", "num_frames", "elapsed_s", "expected"),
    [
        # N = 100 frames, R = 16 ready after 1 s: g = 16 fps, r = 25 fps.
        # needed = 99 * (1 - 16/25) = 35.64 (+8 margin = 43.64) > 16: wait.
        (1, 100, 1.0, False),
        # R = 48 after 1 s: g = 48 fps > r: needed = 0: start.
        (3, 100, 1.0, True),
        # R = 32 after 2 s: g = 16 fps: needed 35.64 + 8 > 32: wait.
        (2, 100, 2.0, False),
        # R = 48 after 3 s: g = 16 fps: 48 >= 43.64: start.
        (3, 100, 3.0, True),
        # every frame in hand: start whatever the rate.
        (7, 100, 100.0, True),
        # nothing ready: never.
        (0, 100, 1.0, False),
    ],
)
def test_ready_to_start_matches_the_hand_computed_jitter_buffer(ready_chunks, num_frames, elapsed_s, expected):
    from latentsync.engines import ChunkResult

    task = Task(task_id="t", audio=None, num_frames=num_frames, num_chunks=-(-num_frames // CHUNK_FRAMES))
    clock = [1000.0]
    program = SpeechProgram(task, FakeAvatar(), FPS, clock=lambda: clock[0])
    program.generation_started()
    for k in range(ready_chunks):
        program.add_chunk(ChunkResult("t", k, np.arange(16), np.zeros((16, 2, 2, 3), np.uint8), 0.1))
    clock[0] += elapsed_s
    assert program.ready_to_start() is expected


def test_program_events_drive_the_task():
    task = Task(task_id="t", audio=speech(0.4), num_frames=10, num_chunks=1)
    task.transition(TaskState.preparing)
    task.transition(TaskState.generating)
    program = SpeechProgram(task, FakeAvatar(), FPS, tick_counter=lambda: 42)
    program.on_air(ProgramEvent.FIRST_FRAME, 0)
    assert task.state is TaskState.streaming and task.first_frame_on_air_monotonic is not None
    task.cancel_requested_tick = 40
    program.on_air(ProgramEvent.INTERRUPTED, 7)
    assert task.state is TaskState.cancelled and task.frames_streamed == 7 and program.is_cancelled()
    program.on_air(ProgramEvent.DONE, 10)  # too late: cancelled stays
    program.on_air(ProgramEvent.OFF_AIR, 12)
    assert task.state is TaskState.cancelled and task.audio is None
    assert task.to_json()["interrupt_latency_frames"] == 2


def test_cancel_fail_and_done_race_through_the_real_callers():
    """The API's cancel, a failed pool job and the mixer's last frame race on a task on air."""
    iterations = 200
    rng = random.Random(5)
    pool = FakePool()
    manager, playlist = fake_manager(pool, FakeAvatar(), generate_ahead=0)
    outcomes = {TaskState.done: 0, TaskState.failed: 0, TaskState.cancelled: 0}
    try:
        for i in range(iterations):
            task, _ = manager.submit(speech(0.4), None, None)  # 10 frames: one chunk
            program = playlist.programs[-1]
            wait_for(lambda task=task: pool.of(task.task_id), "features job")
            features = pool.of(task.task_id)[0]
            pool.take(features)
            features.on_done(np.zeros((CHUNK_FRAMES, 2), np.float32))
            wait_for(lambda task=task: pool.of(task.task_id), "chunk job")
            chunk = pool.of(task.task_id)[0]
            program.on_air(ProgramEvent.FIRST_FRAME, 0)
            assert task.state is TaskState.streaming
            racers = [
                lambda task=task: manager.cancel(task.task_id),
                lambda chunk=chunk: chunk.on_error("chunk failed: boom"),
                lambda program=program: program.on_air(ProgramEvent.DONE, 10),
            ]
            rng.shuffle(racers)
            barrier = threading.Barrier(len(racers))

            def run(racer, barrier=barrier):
                barrier.wait(5.0)
                racer()

            threads = [threading.Thread(target=run, args=(r,)) for r in racers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(5.0)
            final = task.state
            assert final in FINAL_STATES and task.history[:4] == [
                TaskState.queued,
                TaskState.preparing,
                TaskState.generating,
                TaskState.streaming,
            ], i
            assert len(task.history) == 5 and task.history[-1] is final, (i, task.history)
            assert (task.error == "chunk failed: boom") == (final is TaskState.failed), (i, task.error)
            assert pool.of(task.task_id) == [] or final is TaskState.done, i  # cancel and fail drop its jobs
            outcomes[final] += 1
            if final is TaskState.done:  # its chunk job is still queued in the fake pool: finish it
                pool.cancel_task(task.task_id)
        assert manager.final_counts() == {state.value: n for state, n in outcomes.items()}
    finally:
        manager.close()


def test_due_at_is_the_earliest_time_each_chunk_can_be_on_air(setup):
    manager, _, _ = setup
    a, _ = manager.submit(speech(2.0), None, None)  # 50 frames
    b, _ = manager.submit(speech(1.0), None, None)  # 25 frames
    c, _ = manager.submit(speech(1.0), None, None)
    a.first_frame_on_air_monotonic, a.frames_streamed = time.monotonic(), 20  # a on air, 20 frames played

    def due(task, chunk_index):  # (earliest, latest) seconds from now the answer may be (+- float rounding)
        before = time.monotonic()
        at = manager.due_at(task, chunk_index)
        return at - time.monotonic() - 1e-9, at - before + 1e-9

    for task, chunk_index, expected_s in [
        (a, 2, (32 - 20) / FPS),  # frame 32 of a, 12 frames from now
        (a, 0, (0 - 20) / FPS),  # already played: overdue, first in line
        (b, 0, (50 - 20) / FPS),  # when a ends
        (b, 1, (50 - 20 + 16) / FPS),
        (c, 1, (50 - 20 + 25 + 16) / FPS),  # after a and b
    ]:
        low, high = due(task, chunk_index)
        assert low <= expected_s <= high, (task.task_id, chunk_index, low, expected_s, high)
    manager.cancel(a.task_id)  # a gone: b is first in line and could start now
    low, high = due(b, 1)
    assert low <= 16 / FPS <= high


def test_an_avatar_switch_waits_until_no_task_is_unfinished_and_never_mixes_avatars(setup):
    manager, pool, playlist = setup
    a, _ = manager.submit(speech(1.0), None, None)
    new_pool, new_avatar, switched = FakePool(), FakeAvatar(), []
    assert not manager.switch_avatar(new_pool, new_avatar, lambda: switched.append(1)), "a task is unfinished"
    assert switched == [] and manager.avatar is not new_avatar
    stale_program = SpeechProgram(Task("x", speech(0.5), 13, 1), manager.avatar, FPS)  # built before the switch
    manager.cancel(a.task_id)
    assert manager.switch_avatar(new_pool, new_avatar, lambda: switched.append(1))
    assert switched == [1] and manager.binding() == (new_pool, new_avatar)
    stale = TaskProcessor(stale_program.task, stale_program, pool, stale_program.avatar, 5.0)
    assert not manager.accept(stale_program.task, stale_program, stale), "a program of the old avatar is refused"
    b, _ = manager.submit(speech(1.0), None, None)
    assert playlist.programs[-1].avatar is new_avatar
    wait_for(lambda: new_pool.of(b.task_id), "the new task's first job on the new avatar's pool")
    assert not pool.of(b.task_id)
