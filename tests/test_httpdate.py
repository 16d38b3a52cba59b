"""The per-second cache of the HTTP Date header (proxy.httpdate): the same text as Tornado's."""

from __future__ import annotations

import datetime
import time

import tornado.httputil
import tornado.web

from proxy import httpdate

ORIGINAL = httpdate._format_timestamp


def test_float_times_give_tornados_text_in_every_second_and_across_seconds():
    now = time.time()
    for ts in [0.0, 0.999, 1.0, 1_359_312_200.5, 1_359_312_200.9999, 1_359_312_201.0, 4_102_444_799.99, now,
               now + 0.5, now + 1.0, now - 86_400.25]:
        assert httpdate.format_timestamp(ts) == ORIGINAL(ts), ts
        assert httpdate.format_timestamp(ts) == ORIGINAL(ts), ts  # from the cache now


def test_other_kinds_of_timestamps_pass_through():
    moment = datetime.datetime(2013, 1, 27, 18, 43, 20)
    assert httpdate.format_timestamp(moment) == "Sun, 27 Jan 2013 18:43:20 GMT"
    assert httpdate.format_timestamp(1359312200) == "Sun, 27 Jan 2013 18:43:20 GMT"
    assert httpdate.format_timestamp(time.gmtime(1359312200)) == "Sun, 27 Jan 2013 18:43:20 GMT"


def test_installed_tornado_handlers_send_the_current_date():
    saved = tornado.httputil.format_timestamp
    try:
        httpdate.install()
        assert tornado.httputil.format_timestamp is httpdate.format_timestamp

        class Handler(tornado.web.RequestHandler):
            pass

        handler = Handler.__new__(Handler)  # clear() is where every response gets its Date
        before = time.time()
        handler.clear()
        after = time.time()
        date = handler._headers["Date"]
        assert date in {ORIGINAL(float(int(before))), ORIGINAL(float(int(after)))}
    finally:
        tornado.httputil.format_timestamp = saved
