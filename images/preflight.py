"""Before registering: can this machine build and push the images the tasks name, or do they exist?

flytekit builds an ImageSpec only when it can tell the image is missing. Without Docker it
cannot look into a private registry, prints "Flytekit assumes the image ... already exists"
and registers the tasks anyway; the first pod then waits in ImagePullBackOff. So
``make register`` runs this first:

- Docker answers: flytekit will build and push any image the registry lacks. Exit 0.
- No Docker, ``IMAGES_PUSHED=1``: you built and pushed the images elsewhere (Cloud Build,
  kaniko, a CI runner) under the names printed here. Exit 0.
- No Docker otherwise: write each image's build context (flytekit's own default builder:
  Dockerfile and pinned requirements) to ``build/images/<name>/``, print how to build and
  push them elsewhere (any BuildKit builder), and exit 2 before anything is registered.

    python -m images.preflight [--out build/images]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

NO_DOCKER_EXIT = 2


def docker_problem() -> str | None:
    """Why Docker cannot build here (None: it can). ``DOCKER`` names the client (default ``docker``)."""
    client = os.environ.get("DOCKER", "docker")
    path = shutil.which(client)
    if path is None:
        return f"no `{client}` command on PATH"
    try:
        out = subprocess.run([path, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{client} info` did not answer ({type(e).__name__}: {e})"
    if out.returncode != 0 or not out.stdout.strip():
        return f"`{client} info` failed: {(out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout).strip() else 'no daemon'}"
    return None


def images() -> dict[str, object]:
    from images.specs import cpu_image, gpu_image

    return {"cpu": cpu_image, "gpu": gpu_image}


def write_contexts(out: Path) -> dict[str, Path]:
    """Each image's Docker build context, as flytekit's default builder would send it to Docker."""
    from flytekit.image_spec.default_builder import create_docker_context

    written = {}
    for name, spec in images().items():
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        create_docker_context(spec, target)
        written[name] = target
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/images", help="where to write the build contexts without Docker")
    args = parser.parse_args(argv)
    names = {name: spec.image_name() for name, spec in images().items()}
    listing = "\n".join(f"  {name}: {image}" for name, image in names.items())
    problem = docker_problem()
    if problem is None:
        print(f"Docker answers: flytekit builds and pushes any of these the registry lacks:\n{listing}")
        return 0
    if os.environ.get("IMAGES_PUSHED") == "1":
        print(f"No Docker here ({problem}); IMAGES_PUSHED=1 says these were built and pushed elsewhere:\n{listing}")
        return 0
    contexts = write_contexts(Path(args.out))
    builds = "\n".join(f"  docker buildx build --platform linux/amd64 --tag {names[name]} --push {path}"
                       for name, path in contexts.items())
    print(
        f"Cannot build the task images on this machine: {problem}.\n"
        f"Registering now would name images that may not exist (flytekit assumes they do when it cannot look), "
        f"and every pod would wait in ImagePullBackOff. The tasks need:\n{listing}\n"
        f"Their build contexts are written to {args.out}/. Build and push each on a machine or CI runner with "
        f"Docker BuildKit (the Dockerfiles use RUN --mount; Cloud Build needs DOCKER_BUILDKIT=1), from these "
        f"contexts unchanged (the tag is the spec's hash):\n{builds}\n"
        f"then register with IMAGES_PUSHED=1 make register. Or run make register on a machine with Docker.",
        file=sys.stderr,
    )
    return NO_DOCKER_EXIT


if __name__ == "__main__":
    sys.exit(main())
