"""A teacher over HTTP: ``opd serve`` as a real process on 127.0.0.1, the client, the run.

The server is started, killed and restarted by the tests (bounded waits); the tiny testbed
model is both the served teacher and, loaded in process, the reference it must equal."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from opd.batch import make_batch
from opd.cli import main
from opd.errors import UserError
from opd.models.hf import HFTeacher, load_model
from opd.models.http_teacher import HTTPTeacher
from opd.run.metrics_log import read_metrics
from run_helpers import subprocess_env, tiny_cli_args

V = 24  # the testbed vocabulary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "opd", "serve", model, "--port", str(port)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"opd serve exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("opd serve did not answer within 60 s")


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_student_dir):
    port = free_port()
    proc = start_server(tiny_student_dir, port)
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


def _batch():
    return make_batch([[1, 5, 6], [1, 7]], [[8, 9, 10, 2], [11]], pad_id=0)


@pytest.mark.parametrize("k", [V, 3])
def test_server_scores_equal_the_in_process_teacher(server, tiny_student_dir, k):
    batch = _batch()
    remote = HTTPTeacher(server).score(batch, topk=k)
    local = HFTeacher(load_model(tiny_student_dir), eos_id=2, pad_id=0).score(batch, topk=k)
    m = batch.completion_mask_BT
    torch.testing.assert_close(remote.token_logp_BT[m], local.token_logp_BT[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(remote.topk_logp_BTK[m], local.topk_logp_BTK[m], rtol=1e-5, atol=1e-5)
    assert torch.equal(remote.topk_ids_BTK[m], local.topk_ids_BTK[m])
    if k == V:  # the whole distribution: the entropy is exact
        torch.testing.assert_close(remote.entropy_BT[m], local.entropy_BT[m], rtol=1e-4, atol=1e-5)


def test_models_endpoint_reports_the_vocabulary(server):
    listing = json.loads(urllib.request.urlopen(f"{server}/models", timeout=5).read())
    assert listing["object"] == "list" and listing["data"][0]["opd_vocab_size"] == V
    assert HTTPTeacher(server).vocab_size == V


def test_a_server_down_at_start_is_one_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(UserError, match=f"the teacher server at {url} does not answer"):
        HTTPTeacher(url, timeout_s=2.0)
    assert time.monotonic() - t0 < 5


def test_a_full_distribution_method_refuses_a_server_teacher(server, tiny_student_dir, tmp_path, capsys):
    code = main(["train", *tiny_cli_args(tiny_student_dir, tmp_path / "r"), f"teacher={server}", "method=gkd", "steps=1"])
    assert code == 2 and "only returns top-K log-probs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_opd_through_the_server_equals_the_in_process_teacher(server, tiny_student_dir, tmp_path):
    args = [*tiny_cli_args(tiny_student_dir, tmp_path / "x"), "method=opd", "steps=2"]
    assert main(["train", *args, f"teacher={server}", f"run_dir={tmp_path / 'http'}"]) == 0
    assert main(["train", *args, f"teacher={tiny_student_dir}", f"run_dir={tmp_path / 'local'}"]) == 0
    remote, local = read_metrics(tmp_path / "http"), read_metrics(tmp_path / "local")
    for key in ("loss/pg", "teacher/token_logp"):
        for a, b in zip(remote[1:], local[1:]):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (key, a[key], b[key])
    assert all(r["teacher/retries"] == 0 for r in remote[1:])


def test_the_run_rides_out_a_server_restart(tiny_student_dir, tmp_path):
    """The server is killed after the run's first step and restarted 1.5 s later on the same
    port: the run finishes every step, none lost or repeated, the retries counted."""
    port = free_port()
    server = start_server(tiny_student_dir, port)
    run_dir = tmp_path / "run"
    args = [*tiny_cli_args(tiny_student_dir, run_dir), f"teacher=http://127.0.0.1:{port}/v1", "method=opd", "steps=6",
            "teacher_retries=8", "teacher_timeout_s=5"]
    run = subprocess.Popen([sys.executable, "-m", "opd", "train", *args], env=subprocess_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(r.get("step") == 1 for r in (read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else [])):
            assert time.monotonic() < deadline and run.poll() is None, "the run did not reach step 1"
            time.sleep(0.1)
        stop(server)
        time.sleep(1.5)
        server = start_server(tiny_student_dir, port)
        assert run.wait(timeout=180) == 0, run.stderr.read()[-2000:]
    finally:
        run.kill()
        stop(server)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(7))
    assert sum(r.get("teacher/retries", 0) for r in rows) > 0


def test_rows_are_spread_over_several_servers_and_fail_over(server, tiny_student_dir):
    """Two URLs: rows take turns; with one server killed, its rows retry on the other."""
    port = free_port()
    second = start_server(tiny_student_dir, port)
    try:
        teacher = HTTPTeacher(f"{server},http://127.0.0.1:{port}/v1", backoff_s=0.05)
        batch = _batch()
        both = teacher.score(batch, topk=3)
        assert teacher.take_retries() == 0
        stop(second)
        failover = teacher.score(batch, topk=3)
        assert teacher.take_retries() > 0  # the dead server's rows went to the live one
        m = batch.completion_mask_BT
        torch.testing.assert_close(failover.token_logp_BT[m], both.token_logp_BT[m])
    finally:
        if second.poll() is None:
            stop(second)


@pytest.mark.parametrize("add_sampled", [False, True])
def test_topk_lsm_on_a_server_is_the_sparse_divergence_on_its_top_k(server, tiny_student_dir, add_sampled):
    """K = 3 < V: the loss on the server's top-K equals the naive ``sparse_divergence`` (both
    sides renormalized on the returned ids) from the student's full logits; with the sampled
    token added, the naive divergence on the support mask of those ids and ``y_t``."""
    from opd.losses import sparse_divergence
    from opd.methods.topk_lsm import lsm_loss, lsm_signal, support_divergence
    from opd.models.hf import completion_logits
    from opd.rollouts.base import Experience
    from opd.run.loop import student_view

    batch, k = _batch(), 3
    scores = HTTPTeacher(server).score(batch, topk=k)
    assert not scores.has_full
    exp = Experience(batch, [None, None], torch.tensor([0, 1]), extra={"special_BT": torch.zeros_like(batch.completion_mask_BT)})
    signal = lsm_signal(exp, scores, k=k, add_sampled=add_sampled)
    student = load_model(tiny_student_dir)  # the served model, moved away from it
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=noise))
    loss_BT, _ = lsm_loss(student_view(student, batch), signal)
    loss_BT, logits_BTV = loss_BT.detach(), completion_logits(student, batch).detach()
    if add_sampled:
        support_BTV = torch.zeros_like(logits_BTV, dtype=torch.bool).scatter(-1, scores.topk_ids_BTK, True)
        support_BTV.scatter_(-1, batch.completion_ids_BT.unsqueeze(-1), True)
        local = HFTeacher(load_model(tiny_student_dir), eos_id=2, pad_id=0).score(batch, topk=V)
        teacher_BTV = torch.full_like(logits_BTV, float("-inf")).scatter(-1, local.topk_ids_BTK, local.topk_logp_BTK)
        want_BT = support_divergence(logits_BTV, teacher_BTV, support_BTV, "rkl")
    else:
        want_BT = sparse_divergence(logits_BTV, scores.topk_ids_BTK, scores.topk_logp_BTK, "rkl", renormalize="both")
    m = batch.completion_mask_BT
    assert float(want_BT[m].abs().max()) > 1e-3  # a divergence that is there to match
    torch.testing.assert_close(loss_BT[m], want_BT[m], rtol=1e-5, atol=1e-6)


def test_topk_lsm_runs_on_a_server_and_with_k_equal_v_matches_the_local_teacher(server, tiny_student_dir, tmp_path):
    args = [*tiny_cli_args(tiny_student_dir, tmp_path / "x"), "method=topk_lsm", f"lsm_k={V}", "steps=2"]
    assert main(["train", *args, f"teacher={server}", f"run_dir={tmp_path / 'http'}"]) == 0
    assert main(["train", *args, f"teacher={tiny_student_dir}", f"run_dir={tmp_path / 'local'}"]) == 0
    remote, local = read_metrics(tmp_path / "http"), read_metrics(tmp_path / "local")
    for a, b in zip(remote[1:], local[1:]):
        assert abs(a["loss/rkl_topk"] - b["loss/rkl_topk"]) <= 1e-4 * max(1.0, abs(b["loss/rkl_topk"]))
        assert a["signal/support_size"] == pytest.approx(V)


def test_a_response_cut_off_mid_body_is_retried(server):
    """A server that dies while it sends a response body (IncompleteRead) is a transport
    failure like a refused connection: retried, counted, and the answer is the real one."""
    import http.server
    import threading

    cuts = []

    class CutOnce(http.server.BaseHTTPRequestHandler):
        def _forward(self, body=None):
            with urllib.request.urlopen(urllib.request.Request(server + self.path.removeprefix("/v1"), data=body,
                                                               headers={"Content-Type": "application/json"})) as resp:
                return resp.read()

        def do_GET(self):
            self._reply(self._forward())

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if not cuts:
                cuts.append(1)  # the first answer: headers promise 1,000 bytes, 10 arrive, the socket closes
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"choices"')
                self.wfile.flush()
                self.close_connection = True
                return
            self._reply(self._forward(body))

        def _reply(self, data):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutOnce)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        batch = _batch()
        cut = HTTPTeacher(f"http://127.0.0.1:{proxy.server_address[1]}/v1", backoff_s=0.01, concurrency=1)
        got = cut.score(batch, topk=3)
        assert cuts == [1] and cut.take_retries() == 1
        want = HTTPTeacher(server).score(batch, topk=3)
        m = batch.completion_mask_BT
        torch.testing.assert_close(got.token_logp_BT[m], want.token_logp_BT[m])
    finally:
        proxy.shutdown()
