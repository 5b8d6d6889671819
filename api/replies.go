package api

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// ReasonReplyTooLarge: the reply is larger than the message limit
// (--msg-bytes-max) and was not sent. Final. The message says whether the
// call changed anything and how to learn its outcome. The ledger bounds
// replies before they exist (SubmitBatch before COMMIT, pages by bytes), so
// this is a last line: without it grpc-go would answer RESOURCE_EXHAUSTED,
// which callers retry, for a call that can never succeed and may have
// committed.
const ReasonReplyTooLarge = "REPLY_TOO_LARGE"

// writeOutcome says, per method that changes state, what a too-large reply
// means for the caller.
var writeOutcome = map[string]string{
	tallyv1.LedgerService_SubmitBatch_FullMethodName: "the batch was applied (or its stored outcome replayed) but the reply cannot be sent; " +
		"learn each operation's outcome by resending it alone with its own idempotency key (a replay never applies twice) " +
		"or with GetTransfer{idempotency_key}; resending the batch replays the same reply",
	tallyv1.LedgerService_Charge_FullMethodName:          committedByKey,
	tallyv1.LedgerService_Credit_FullMethodName:          committedByKey,
	tallyv1.LedgerService_Transfer_FullMethodName:        committedByKey,
	tallyv1.LedgerService_Refund_FullMethodName:          committedByKey,
	tallyv1.LedgerService_Hold_FullMethodName:            committedByKey,
	tallyv1.LedgerService_CaptureHold_FullMethodName:     committedByKey,
	tallyv1.LedgerService_ReleaseHold_FullMethodName:     committedByKey,
	tallyv1.LedgerService_CreateAccount_FullMethodName:   committedAccount,
	tallyv1.LedgerService_FreezeAccount_FullMethodName:   committedAccount,
	tallyv1.LedgerService_UnfreezeAccount_FullMethodName: committedAccount,
	tallyv1.LedgerService_CloseAccount_FullMethodName:    committedAccount,
	tallyv1.LedgerService_UpdateAccount_FullMethodName:   committedAccount,
}

const (
	committedByKey   = "the operation was applied (or replayed) but the reply cannot be sent; its outcome is stored under its idempotency key: GetTransfer{idempotency_key} or GetHold"
	committedAccount = "the change was applied but the reply cannot be sent; read the account with GetAccount"
	readOnly         = "nothing was changed; ask for less (a smaller page_size, fewer account_ids or a narrower range)"
)

// replyFits answers REPLY_TOO_LARGE (FAILED_PRECONDITION, final) instead of
// a reply grpc-go would refuse to send.
func replyFits(sendMax int) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		resp, err := h(ctx, req)
		if err != nil {
			return resp, err
		}
		m, ok := resp.(proto.Message)
		if !ok {
			return resp, nil
		}
		if n := proto.Size(m); n > sendMax {
			outcome, changed := writeOutcome[info.FullMethod]
			if !changed {
				outcome = readOnly
			}
			if b, isBatch := resp.(*tallyv1.SubmitBatchResponse); isBatch && !b.GetApplied() {
				changed = false
				outcome = "the ATOMIC batch was not applied (its outcome is stored under batch_key); send its operations in smaller batches under a new batch_key"
			}
			return nil, newStatus(codes.FailedPrecondition, ReasonReplyTooLarge,
				fmt.Sprintf("the reply of %d bytes is larger than the message limit of %d bytes (--msg-bytes-max): %s", n, sendMax, outcome),
				map[string]string{"committed": fmt.Sprint(changed)})
		}
		return resp, nil
	}
}
