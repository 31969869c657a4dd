"""HTTP/2 to clients on hyper-h2: the connection layer (L{connection}), one
stream per request (L{stream}), bridged to the L7 exchange (L{bridge});
the header translation (L{request}), flood allowances (L{flood}), the
listener's protocol choice by ALPN or preface (L{negotiate}) and gRPC's
own error answers (L{grpc})."""
