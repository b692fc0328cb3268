"""`bootstrap/bootstrap.sh`: installs a MIaaS cluster on many hosts over SSH from one cluster file.

`config` reads the file, `render` turns it into each host's files and units, `ssh` reaches the hosts, `hostside`
runs on them (standard library only), `run` holds the phases."""
