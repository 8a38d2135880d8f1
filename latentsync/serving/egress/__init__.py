"""Egress: where the program leaves the server: the FFmpeg RTMP sink and WHEP (WebRTC) viewers."""
