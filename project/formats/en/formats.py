# Timestamps with seconds everywhere Django formats a datetime (the admin above all): operators
# compare them with logs and events, where a minute is far too coarse.
DATETIME_FORMAT = "Y-m-d H:i:s"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s"
TIME_FORMAT = "H:i:s"
DATE_FORMAT = "Y-m-d"
