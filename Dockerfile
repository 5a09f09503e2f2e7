# One image for the publisher, subscriber, archiver and dashboard services of docker-compose.yml.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN pip install pipenv
COPY Pipfile Pipfile.lock ./
RUN pipenv install --system --deploy && pip uninstall -y pipenv
COPY wikipulse ./wikipulse
COPY publisher.py subscriber.py archiver.py dash_app.py ./
USER nobody
CMD ["python", "-m", "wikipulse", "--help"]
