"""The task layer with fakes at its two seams (tests/fakes.py): the job queue and the playout.

Feed tasks in, drive the fake pool's jobs by hand, assert what comes out and in which order. No
processes, no clock assertions: every wait is for a condition with a generous timeout.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from latentsync.engines import ChunkResult
from latentsync.serving.playout.mixer import ProgramEvent
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.speech_program import SpeechProgram
from latentsync.serving.tasks.task import ALLOWED_MOVES, FINAL_STATES, Task, TaskKind, TaskState
from latentsync.serving.tasks.utterance import Utterance
from tests.fakes import (
    FPS,
    RATE,
    FakeAvatar,
    FakePool,
    fake_manager,
    settings,
    speech,
    submit_upload,
    wait_for,
)


@pytest.fixture
def setup():
    pool = FakePool()
    manager, playlist = fake_manager(pool, FakeAvatar())
    yield manager, pool, playlist
    manager.close()


def test_only_the_task_on_air_and_the_next_generate_and_cancel_frees_at_once(setup):
    manager, pool, playlist = setup
    a, _ = submit_upload(manager, 2.0)
    b, position_b = submit_upload(manager, 2.0)
    c, position_c = submit_upload(manager, 2.0)
    assert (position_b, position_c) == (1, 2)
    wait_for(lambda: pool.of(a.task_id) and pool.of(b.task_id), "first jobs of a and b")
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


def test_a_short_first_chunk_then_doubling_chunks_in_order_into_the_program(setup):
    manager, pool, playlist = setup
    task, _ = submit_upload(manager, 1.5, 3, 1.5)  # 38 frames, no tail: 4 + 8 + 16 + 10
    wait_for(lambda: len(pool.of(task.task_id)) == 4, "four chunk jobs")
    jobs = pool.of(task.task_id)
    assert [j.chunk_index for j in jobs] == [0, 1, 2, 3]
    assert [j.frames for j in jobs] == [4, 8, 16, 10]
    assert [j.due_at for j in jobs] == sorted(j.due_at for j in jobs)
    assert jobs[1].due_at - jobs[0].due_at == pytest.approx(4 / FPS, abs=0.05)
    assert jobs[3].job.frame_indices.tolist() == list(range(28, 38))  # the last chunk as long as what is left
    assert (jobs[0].job.seed, jobs[0].job.guidance_scale, jobs[0].job.avatar) == (3, 1.5, "fake-avatar")
    # each job carries the audio its features need (5 s before it, its look-ahead, 2.5 s after): its rows in it
    assert jobs[0].job.rows == (0, 4) and jobs[2].job.rows == (12, 28)
    assert task.state is TaskState.generating and task.chunks_total == 4
    program = playlist.programs[0]
    for job in reversed(jobs):  # out of order: the program puts them back in order
        pool.take(job)
        pool.complete(job, fill=10 * job.chunk_index)
    assert task.chunks_generated == 4 and program.ready_to_start()
    firsts = [int(program.frame(i)[0, 0, 0]) for i in (0, 3, 4, 11, 12, 27, 28, 37)]
    assert firsts == [0, 3, 10, 17, 20, 35, 30, 39]


def test_latentsync_chunks_stay_16_frames_and_the_last_is_padded():
    pool = FakePool()
    manager, _ = fake_manager(pool, FakeAvatar(), "engine.name=latentsync")
    try:
        task, _ = submit_upload(manager, 1.0)  # 25 frames: 16 + 9 (padded to 16)
        wait_for(lambda: len(pool.of(task.task_id)) == 2, "two chunk jobs")
        first, last = pool.of(task.task_id)
        assert (first.frames, last.frames) == (16, 9)
        assert last.job.frame_indices.tolist() == list(range(16, 25)) + [24] * 7
    finally:
        manager.close()


def test_a_failed_job_fails_the_task_and_admits_the_next(setup):
    manager, pool, _ = setup
    a, _ = submit_upload(manager, 1.0)
    b, _ = submit_upload(manager, 1.0)
    c, _ = submit_upload(manager, 1.0)
    job = pool.next_of(a.task_id)
    job.on_error("chunk 0 failed: boom")
    wait_for(lambda: a.state is TaskState.failed, "a failed")
    assert a.error == "chunk 0 failed: boom" and a.audio is None and pool.of(a.task_id) == []
    wait_for(lambda: pool.of(c.task_id), "c admitted once a failed")
    assert manager.final_counts() == {"done": 0, "failed": 1, "cancelled": 0}


def test_queue_limit_and_trim_of_finished_tasks():
    pool = FakePool()
    manager, _ = fake_manager(pool, FakeAvatar(), "tasks.max_finished=2")
    try:
        accepted = [submit_upload(manager, 0.5)[0] for _ in range(4)]
        with pytest.raises(SpeechError) as err:  # max_queued=4 wait already
            submit_upload(manager, 0.5)
        assert err.value.code == "queue_full"
        for task in accepted:
            manager.cancel(task.task_id)
        assert manager.waiting() == 0
        fifth, _ = submit_upload(manager, 0.5)  # trims the oldest finished tasks
        listed = [t.task_id for t in manager.list()]
        assert listed[:3] == [fifth.task_id, accepted[3].task_id, accepted[2].task_id]
        assert manager.final_counts() == {"done": 0, "failed": 0, "cancelled": 4}
    finally:
        manager.close()


@pytest.mark.slow  # 2000 races of three threads: ~7 s
def test_lifecycle_races_never_make_an_illegal_move():
    """Cancel, fail and done race from three threads on a task on air; the first final move wins."""
    iterations = 2000
    rng = random.Random(11)
    for i in range(iterations):
        task = Task(task_id=f"t{i}", num_frames=10)
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
    task = Task(task_id="t", num_frames=10)
    assert task.transition(TaskState.done) is None and task.state is TaskState.queued  # queued -> done: no
    assert task.transition(TaskState.cancelled) is TaskState.queued
    for state in TaskState:
        assert task.transition(state) is None  # final: nothing moves it
    assert task.history == [TaskState.queued, TaskState.cancelled]
    assert all(not ALLOWED_MOVES[s] for s in FINAL_STATES)


def _program(num_frames: int, clock) -> tuple[SpeechProgram, Task]:
    """A program over an ended utterance of ``num_frames`` frames, 16-frame chunks planned."""
    task = Task(task_id="t")
    utterance = Utterance(task, fps=FPS, sample_rate_hz=RATE, limits=settings().uploaded, clock=clock)
    utterance.push(np.zeros(num_frames * RATE // FPS, np.float32), RATE)
    utterance.end()
    program = SpeechProgram(
        task,
        utterance,
        avatar=FakeAvatar(),
        fps=FPS,
        lookahead_frames=1,
        min_chunk_frames=4,
        max_frames_ahead=768,
        start_margin_s=0.04,
        clock=clock,
    )
    for k, start in enumerate(range(0, num_frames, 16)):
        program.plan(k, start, min(16, num_frames - start))
    return program, task


@pytest.mark.parametrize(
    ("ready_chunks", "num_frames", "chunk_s", "expected"),
    [
        # N = 100 frames; 16-frame chunks planned at once, the pool takes chunk_s for each, one after the other.
        # R = 16 after 1 s: g = 16 fps, r = 25 fps: needed = 99 * (1 - 16/25) = 35.64 (+8 margin = 43.64) > 16: wait.
        (1, 100, 1.0, False),
        # R = 48 after 1 s: g = 48 fps > r: needed = 0, and chunk 3 (same length as chunk 0) is due in
        # 2 x 1/3 s after the worker is past chunk 0: long before frame 48 plays: start.
        (3, 100, 1 / 3, True),
        # R = 32 after 2 s: g = 16 fps: needed 35.64 + 8 > 32: wait.
        (2, 100, 1.0, False),
        # R = 48 after 3 s: g = 16 fps: 48 >= 43.64, chunk 3 due 2 s after chunk 0 came back (2 s ago): start.
        (3, 100, 1.0, True),
        # every frame in hand: start whatever the rate.
        (7, 100, 100.0, True),
        # nothing ready: never.
        (0, 100, 1.0, False),
    ],
)
def test_ready_to_start_matches_the_hand_computed_jitter_buffer(ready_chunks, num_frames, chunk_s, expected):
    clock = [1000.0]
    program, _ = _program(num_frames, lambda: clock[0])
    program.generation_started()
    for k in range(len(program._ends)):
        program.chunk_audio_at[k] = 1000.0  # every chunk planned at once (its audio is all there)
    for k in range(ready_chunks):
        clock[0] += chunk_s
        program.add_chunk(
            ChunkResult(
                task_id="t",
                chunk_index=k,
                frame_indices=np.arange(16),
                faces=np.zeros((16, 2, 2, 3), np.uint8),
                generate_s=0.1,
            )
        )
    assert program.ready_to_start() is expected


def test_program_events_drive_the_task():
    program, task = _program(10, time.monotonic)
    task.transition(TaskState.preparing)
    task.transition(TaskState.generating)
    program._tick_counter = lambda: 42
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
    manager, playlist = fake_manager(pool, FakeAvatar(), "tasks.generate_ahead=0", "engine.first_chunk_frames=16")
    outcomes = {TaskState.done: 0, TaskState.failed: 0, TaskState.cancelled: 0}
    try:
        for i in range(iterations):
            task, _ = submit_upload(manager, 0.4)  # 10 frames: one chunk
            program = playlist.programs[-1]
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
                pool.cancel(task.task_id)
        assert manager.final_counts() == {state.value: n for state, n in outcomes.items()}
    finally:
        manager.close()


def test_due_at_is_the_earliest_time_each_frame_can_be_on_air(setup):
    manager, _, _ = setup
    a, _ = submit_upload(manager, 2.0)  # 50 frames
    b, _ = submit_upload(manager, 1.0)  # 25 frames
    c, _ = submit_upload(manager, 1.0)
    a.first_frame_on_air_monotonic, a.frames_streamed = time.monotonic(), 20  # a on air, 20 frames played

    def due(task, frame):  # (earliest, latest) seconds from now the answer may be (+- float rounding)
        before = time.monotonic()
        at = manager.due_at(task, frame)
        return at - time.monotonic() - 1e-9, at - before + 1e-9

    for task, frame, expected_s in [
        (a, 32, (32 - 20) / FPS),  # frame 32 of a, 12 frames from now
        (a, 0, (0 - 20) / FPS),  # already played: overdue, first in line
        (b, 0, (50 - 20) / FPS),  # when a ends
        (b, 16, (50 - 20 + 16) / FPS),
        (c, 16, (50 - 20 + 25 + 16) / FPS),  # after a and b
    ]:
        low, high = due(task, frame)
        assert low <= expected_s <= high, (task.task_id, frame, low, expected_s, high)
    manager.cancel(a.task_id)  # a gone: b is first in line and could start now
    low, high = due(b, 16)
    assert low <= 16 / FPS <= high


def test_an_avatar_switch_waits_until_no_task_is_unfinished_and_never_mixes_avatars(setup):
    manager, pool, playlist = setup
    a, _ = submit_upload(manager, 1.0)
    new_avatar, switched = FakeAvatar(), []
    new_avatar.path = "new-avatar"
    built = manager.build(TaskKind.upload)  # built before the switch, accepted after it
    assert not manager.switch_avatar(new_avatar, lambda: switched.append(1)), "a task is unfinished"
    assert switched == [] and manager.avatar is not new_avatar
    manager.cancel(a.task_id)
    assert manager.switch_avatar(new_avatar, lambda: switched.append(1))
    assert switched == [1] and manager.avatar is new_avatar
    built.push(speech(1.0), RATE)
    built.end()
    manager.accept(built)
    assert playlist.programs[-1].avatar is new_avatar, "a task is bound to the avatar when it is accepted"
    job = pool.next_of(built.task_id)
    assert job.job.avatar == "new-avatar"


def test_cancel_is_one_call_that_stops_the_sources_too(setup):
    manager, pool, _ = setup

    class Source:
        closed = 0

        def close(self):
            self.closed += 1

    utterance = manager.open(TaskKind.stream)
    source = Source()
    utterance.attach(source)
    utterance.push(speech(1.0), RATE)
    wait_for(lambda: pool.of(utterance.task_id), "a job")
    manager.cancel(utterance.task_id)
    assert source.closed == 1 and pool.of(utterance.task_id) == [] and utterance.task.audio is None
    late = Source()
    utterance.attach(late)  # a source attached after the cancel is closed at once
    assert late.closed == 1
    with pytest.raises(SpeechError) as err:
        utterance.push(speech(0.1), RATE)
    assert err.value.code == "not_open"


def test_chunk_times_predict_the_90th_percentile_of_recent_chunks_of_the_same_length():
    from latentsync.serving.tasks.speech_program import ChunkTimes

    times = ChunkTimes(size=10)
    assert times.predict(4) is None
    for seconds in (0.04, 0.05, 0.06, 0.20):
        times.add(4, seconds)
    times.add(16, 0.5)
    assert times.predict(4) == pytest.approx(np.percentile([0.04, 0.05, 0.06, 0.20], 90))
    assert times.predict(16) is None  # one long chunk is not enough evidence
    for _ in range(20):
        times.add(8, 0.05)  # the oldest short ones are forgotten
    assert times.predict(2) == pytest.approx(0.05)


def test_a_program_with_faces_of_the_wrong_shape_fails_its_task_on_air_and_the_stream_goes_on(setup):
    """Faces that get past the pool's check (here a fake pool has none) fail their task in the mixer."""
    from latentsync.serving.playout.idle import IdleLoop
    from latentsync.serving.playout.mixer import ProgramMixer
    from latentsync.serving.playout.state import StreamState

    manager, pool, playlist = setup
    a, _ = submit_upload(manager, 0.4)  # 10 frames: one chunk
    b, _ = submit_upload(manager, 0.4)
    job = pool.next_of(a.task_id)
    n = len(job.job.frame_indices)
    job.on_done(
        ChunkResult(
            task_id=a.task_id,
            chunk_index=0,
            frame_indices=job.job.frame_indices,
            faces=np.zeros((n, 3, 3, 3), np.uint8),  # the stream's frames are 2x2 (FakeAvatar)
            generate_s=0.0,
        )
    )
    mixer = ProgramMixer(IdleLoop(np.zeros((4, 2, 2, 3), np.uint8), None), 2)
    mixer.enqueue(playlist.programs[0])
    ticks = [mixer.next(RATE // FPS) for _ in range(8)]
    assert all(frame.shape == (2, 2, 3) for frame, _ in ticks) and mixer.state is StreamState.IDLE
    wait_for(lambda: a.state is TaskState.failed, "a failed")
    assert a.error.startswith(f"playout of task {a.task_id} failed: ValueError: frame is (3, 3, 3) uint8")
    assert a.audio is None and mixer.programs_failed == 1
    wait_for(lambda: pool.of(b.task_id), "b generates")  # the next task goes on
    assert manager.final_counts()["failed"] == 1
