# Builds tallyd and tally into a small image. Used by docker-compose.yml.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /out/tallyd ./cmd/tallyd \
 && CGO_ENABLED=0 go build -trimpath -o /out/tally ./cmd/tally

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/tallyd /out/tally /usr/local/bin/
EXPOSE 7070 7071
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/tallyd"]
CMD ["serve"]
