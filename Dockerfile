# The distributor's image: FROM scratch, the release binary and only what it needs at run time.
# Built by scripts/image.sh, which stages the context: nothing is pulled from a registry.
#
# The binary links glibc dynamically (libc, libm, libgcc_s and the loader, copied from the
# build host); host names (nats://nats-1:4222) resolve through glibc's NSS with the `files` and
# `dns` modules and /etc/nsswitch.conf. CA roots for NATS TLS: /etc/ssl/certs. It runs as an
# unprivileged user, listens on $PORT (8080 unless set, as Cloud Run does), and drains on SIGTERM.
FROM scratch
COPY rootfs/ /
USER 65532:65532
ENV PORT=8080
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD ["/distributor", "health"]
ENTRYPOINT ["/distributor"]
