# The same `/` route as the tower-exit demo, as a WSGI app for gunicorn.
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\n"]
