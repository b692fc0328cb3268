"""The MIaaS portal: the web pages through which people log in, upload, deploy and watch models."""
