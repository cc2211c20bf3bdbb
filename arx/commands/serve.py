"""arx serve BUNDLE [--port 8000] [--max-batch 8] [--engine TARGET]: the OpenAI-compatible server."""

from __future__ import annotations

import sys

from arx.errors import ArxError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API "
                                     "(continuous batching, streaming)")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (cache slots)")
    p.add_argument("--max-queue", type=int,
                   help="requests that may wait for a slot before new ones get 429 (default 4x max-batch)")
    # defaults in serve/scheduler.py (not imported here: every arx command builds this parser)
    p.add_argument("--prefill-chunk", type=int,
                   help="prompt tokens prefilled per step, all new requests together, while "
                        "other requests decode: bounds their inter-token latency (default 32)")
    p.add_argument("--prefill-chunk-idle", type=int,
                   help="the same while no request decodes (default 64)")
    p.add_argument("--model-name", help="the model id clients send (default: the bundle's name)")
    p.add_argument("--engine", metavar="TARGET",
                   help="serve the TensorRT engine `arx build --target TARGET` made (needs TensorRT "
                        "and a GPU) instead of the ONNX graph on ORT")
    p.add_argument("--triton-repo", metavar="DIR",
                   help="write a Triton Inference Server model repository for the bundle into DIR "
                        "(the decoder with the KV cache as implicit state, the loop as a Python "
                        "backend model) and exit, instead of serving")
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve (a local cluster, or the one RAY_ADDRESS names): "
                        "--replicas copies of the server behind its HTTP proxy")
    p.add_argument("--replicas", type=int, help="with --ray: server replicas (default 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: one per core)")
    p.add_argument("--no-spin", action="store_true",
                   help="idle threads sleep instead of spinning (better when cores are shared)")
    p.set_defaults(run=run)


def run(args) -> int:
    from contextlib import ExitStack

    from arx import needs

    if args.triton_repo:
        return _triton_repo(args)
    needs.check("serve", args)
    if not 0 <= args.port < 65536:
        raise ArxError(f"--port must be in 0..65535 (got {args.port})")
    if args.max_queue is not None and args.max_queue < 0:
        raise ArxError(f"--max-queue must be >= 0 (got {args.max_queue})")
    from arx.serve.server import check_address, make_server, serve_forever

    check_address(args.host, args.port)  # before the bundle loads
    if args.ray or args.replicas is not None:
        return _ray(args)
    with ExitStack() as stack:
        session = stack.enter_context(_session(args))
        server = make_server(session, args.bundle, **_server_options(args))
        print(f"arx serve: {server.model} on http://{args.host}:{args.port}/v1 "
              f"(max batch {args.max_batch}, context {server.scheduler.max_len}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        serve_forever(server, args.host, args.port)
    return 0


def _triton_repo(args) -> int:
    """Needs no serve extra: the repository is files (the loop runs inside Triton)."""
    from pathlib import Path

    from arx.serve.triton import write_repo

    if args.engine:
        raise ArxError("--triton-repo writes the ONNX decoder (Triton's onnxruntime backend); "
                       "drop --engine")
    out, bundle = Path(args.triton_repo), Path(args.bundle)
    if not (bundle / "arx.json").is_file():
        raise ArxError(f"{bundle} is not an arx bundle (no arx.json); give the folder arx export "
                       f"wrote")
    if out.exists():
        raise ArxError(f"{out} already exists; remove it or choose another --triton-repo DIR")
    name = args.model_name or bundle.resolve().name.removesuffix(".arx")
    write_repo(bundle, out, name=name, max_batch=args.max_batch)
    print(f"arx serve: wrote Triton model repository {out} (models {name}, {name}_decoder); "
          f"tritonserver --model-repository {out}", file=sys.stderr)
    return 0


def _server_options(args) -> dict:
    """make_server's options: the prefill ones given (the scheduler's defaults otherwise)."""
    given = {"chunk": args.prefill_chunk, "idle_chunk": args.prefill_chunk_idle}
    return {"max_batch": args.max_batch, "max_queue": args.max_queue, "model": args.model_name,
            **{k: v for k, v in given.items() if v is not None}}


def _ray(args) -> int:
    from pathlib import Path

    if not args.ray:
        raise ArxError("--replicas needs --ray (one arx serve process is one server)")
    if args.engine:
        raise ArxError("--ray serves the ONNX graph on ORT for now; drop --engine")
    if args.replicas is not None and args.replicas < 1:
        raise ArxError(f"--replicas must be >= 1 (got {args.replicas})")
    if not (Path(args.bundle) / "arx.json").is_file():
        raise ArxError(f"{args.bundle} is not an arx bundle (no arx.json); give the folder arx "
                       f"export wrote")
    from arx.serve import ray_app

    replicas = args.replicas or 1
    print(f"arx serve: {replicas} Ray Serve replicas of {args.bundle} on "
          f"http://{args.host}:{args.port}/v1; Ctrl-C stops", file=sys.stderr, flush=True)
    backend = {"device": args.device, "intra_op_threads": args.threads,
               "spin_wait": not args.no_spin}
    try:
        ray_app.run(args.bundle, host=args.host, port=args.port, replicas=replicas,
                    options=_server_options(args), backend=backend)
    finally:
        ray_app.shutdown()
    return 0


def _session(args):
    if args.engine:
        from arx.runtime import engine_session

        return engine_session.open_engine(args.bundle, args.engine)
    from arx.runtime.backend import BackendOptions
    from arx.runtime.decoder import DecoderSession

    return DecoderSession(args.bundle, BackendOptions(device=args.device,
                                                      intra_op_threads=args.threads,
                                                      spin_wait=not args.no_spin))
